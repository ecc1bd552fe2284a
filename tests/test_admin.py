"""``python -m service.admin``: listing the stored vectors per model and forgetting one model's, checked
against the rows themselves; bad targets answered with one line and exit 2."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_gallery_models import NEW, OLD, answers, embedder, enroll

from service.admin import main
from service.gallery import Gallery

DIM = 16


def test_models_lists_and_forget_model_deletes_one_models_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CENTERID_DATA_DIR", str(tmp_path))
    with Gallery.open(tmp_path, DIM, "old") as gallery:
        image_of = enroll(gallery, OLD, "a", range(0, 7))
    with Gallery.open(tmp_path, DIM, "new") as gallery:
        assert gallery.reembed(embedder(NEW)) == 7
    assert main(["models"]) == 0
    assert capsys.readouterr().out.splitlines() == ["new\t7", "old\t7"]
    assert main(["forget-model", "old"]) == 0 and "deleted 7 vectors" in capsys.readouterr().out
    assert main(["forget-model", "old"]) == 0 and "deleted 0 vectors" in capsys.readouterr().out
    with Gallery.open(tmp_path, DIM, "new") as gallery:
        assert gallery.models() == {"new": 7} and gallery.count() == 7
        answers(gallery, NEW, image_of)  # the remaining model answers as before
    with Gallery.open(tmp_path, DIM, "old") as gallery:  # a replica back on the forgotten model embeds again
        assert gallery.pending_reembed == 7
        gallery.reembed(embedder(OLD))
        answers(gallery, OLD, image_of)
        assert np.isclose(gallery.embeddings("a") @ OLD[0], 1, atol=1e-6).sum() == 1


def test_no_gallery_and_unreachable_database_are_one_line_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CENTERID_DATA_DIR", str(tmp_path / "nothing"))
    assert main(["models"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("centerid admin: no gallery in") and error.count("\n") == 1
    assert not (tmp_path / "nothing").exists()  # nothing was created by looking
    monkeypatch.setenv("CENTERID_DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")
    assert main(["models"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("centerid admin: cannot connect to the gallery database") and error.count("\n") == 1
