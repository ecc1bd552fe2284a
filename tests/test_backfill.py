"""The background re-embedding and a gallery's threads: an image this model cannot embed is warned about once
and left alone for a wait that doubles from the poll period up to a cap (driven here by a fake clock, no
sleeps), counted as ``unembeddable`` in /info, forgotten once embedded or deleted; the memory of failures is
bounded."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from service.errors import NotReady, Overloaded
from service.gallery import Gallery
from service.gallery_backoff import BACKOFF_MAX_S, EmbedBackoff
from service.gallery_models import BACKFILL_POLL_S

DIM = 8
IMAGES = 12
VECTORS = np.random.default_rng(3).normal(size=(IMAGES, DIM)).astype(np.float32)
BAD = 4  # the image number the fake model cannot embed


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeModel:
    """Maps image ``b"n"`` to ``VECTORS[n]``; refuses image ``BAD`` while ``refuses`` is set. Counts how
    often each image was offered to it."""

    def __init__(self) -> None:
        self.refuses = True
        self.offered: dict[int, int] = {}

    def __call__(self, blobs: list[bytes]) -> np.ndarray:
        numbers = [int(blob) for blob in blobs]
        for n in numbers:
            self.offered[n] = self.offered.get(n, 0) + 1
        if self.refuses and BAD in numbers:
            raise ValueError("no face found in\nthe image")  # a two-line reason: logged on one line
        return VECTORS[numbers]


def upgraded_gallery(tmp_path: Path, count: int = 9) -> tuple[Gallery, dict[int, int], FakeClock]:
    """Entries of images 0..count-1 enrolled by model "old", reopened on model "new" with a fake clock."""
    with Gallery.open(tmp_path, DIM, "old") as old:
        entries = old.add("a", VECTORS[:count], [b"%d" % n for n in range(count)])
    gallery = Gallery.open(tmp_path, DIM, "new")
    clock = FakeClock()
    gallery.embed_backoff.clock = clock
    return gallery, {e.id: n for n, e in enumerate(entries)}, clock


def warnings_about(caplog: pytest.LogCaptureFixture, entry_id: int, level: int) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == level and r.getMessage().startswith(f"entry {entry_id} cannot be embedded")
    ]


def test_a_failing_entry_is_warned_about_once_and_retried_only_after_its_doubling_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="centerid.gallery")
    gallery, image_of, clock = upgraded_gallery(tmp_path)
    bad = next(i for i, n in image_of.items() if n == BAD)
    model = FakeModel()
    with gallery:
        assert gallery.reembed(model, batch_size=4) == 8  # the first pass: the batch with BAD, then BAD alone
        assert model.offered[BAD] == 2 and gallery.pending_reembed == 1 and len(gallery.embed_backoff) == 1
        others = {n: count for n, count in model.offered.items() if n != BAD}  # 5..7 twice: batch, then alone
        waits = [min(BACKFILL_POLL_S * 2**k, BACKOFF_MAX_S) for k in range(9)]  # 60, 120, … capped at 1 h
        assert waits[-1] == BACKOFF_MAX_S and waits[-2] == BACKOFF_MAX_S
        offered = model.offered[BAD]
        for wait in waits:
            failed_at = clock.now
            for _ in range(3):  # several passes before the wait is over: BAD is not offered again
                clock.now = failed_at + wait - 1
                assert gallery.reembed(model, batch_size=4) == 0
            assert model.offered[BAD] == offered
            clock.now = failed_at + wait
            assert gallery.reembed(model, batch_size=4) == 0
            offered += 1
            assert model.offered[BAD] == offered  # tried again, alone, exactly once
        assert len(warnings_about(caplog, bad, logging.WARNING)) == 1  # once across every pass
        assert len(warnings_about(caplog, bad, logging.DEBUG)) == len(waits)  # the repeats, quietly
        assert "no face found in the image" in warnings_about(caplog, bad, logging.WARNING)[0]
        assert {n: c for n, c in model.offered.items() if n != BAD} == others  # embedded: never offered again


def test_a_later_success_clears_the_failure(tmp_path: Path) -> None:
    gallery, image_of, clock = upgraded_gallery(tmp_path)
    bad = next(i for i, n in image_of.items() if n == BAD)
    model = FakeModel()
    with gallery:
        gallery.reembed(model, batch_size=4)
        model.refuses = False  # e.g. the pipeline was fixed: the next try succeeds
        clock.now += BACKFILL_POLL_S
        assert gallery.reembed(model, batch_size=4) == 1
        assert gallery.pending_reembed == 0 and len(gallery.embed_backoff) == 0
        assert gallery.search(VECTORS[BAD], 1)[0][0].entry_id == bad


def test_a_deleted_entry_is_forgotten(tmp_path: Path) -> None:
    gallery, image_of, _ = upgraded_gallery(tmp_path)
    bad = next(i for i, n in image_of.items() if n == BAD)
    with gallery:
        gallery.reembed(FakeModel(), batch_size=4)
        assert gallery.embed_backoff.known([bad]) == {bad}
        assert gallery.delete_entry(bad)
        assert len(gallery.embed_backoff) == 0 and gallery.pending_reembed == 0


def test_a_pass_forgets_failures_another_replica_deleted(tmp_path: Path, database: str) -> None:
    """A delete through another replica is found out by the next full pass over the pending entries."""
    replica = {"database_url": database, "follow_poll_s": 0.2}
    with (
        Gallery.open(tmp_path / "old", DIM, "old", **replica) as old,
        Gallery.open(tmp_path / "new", DIM, "new", **replica) as new,
    ):
        entries = old.add("a", VECTORS[:3], [b"0", b"%d" % BAD, b"not a number"])  # the last fails too
        assert new.reembed(FakeModel()) == 1 and len(new.embed_backoff) == 2
        assert old.delete_entry(entries[1].id)
        assert new.reembed(FakeModel()) == 0  # a pass: nothing due, but it met only the other failure
        assert new.embed_backoff.known(e.id for e in entries) == {entries[2].id}
        assert new.pending_reembed == len(new.embed_backoff) == 1


def test_the_remembered_failures_are_bounded_and_the_oldest_is_forgotten() -> None:
    clock = FakeClock()
    backoff = EmbedBackoff(60.0, capacity=3, clock=clock)
    for entry_id in range(1, 6):
        backoff.failed(entry_id, "m", ValueError("x"))
        assert len(backoff) == min(entry_id, 3)
    assert backoff.known(range(1, 6)) == {3, 4, 5}
    assert backoff.due(1) and backoff.due(2) and not backoff.due(3)  # forgotten: tried at once again


def test_info_counts_the_unembeddable_entries(bundle_dir: Path, tmp_path: Path) -> None:
    """A gallery enrolled on another model with one file that does not decode: the service embeds the rest
    at start-up and /info reports the one it gave up on for now, among the pending ones."""
    from conftest import orl_bytes, service_client

    from training.bundle import load_bundle

    dim = load_bundle(bundle_dir).feat_dim
    data_dir = tmp_path / "gallery"
    with Gallery.open(data_dir, dim, "another-model") as old:
        images = [orl_bytes(1, 1), b"not an image file", orl_bytes(2, 1)]
        old.add("a", np.ones((3, dim), np.float32), images)
    with service_client(bundle_dir, data_dir) as client:
        gallery = client.get("/info").json()["gallery"]
        assert gallery["pending"] == 1 and gallery["unembeddable"] == 1
        assert gallery["size"] == 2 and list(gallery).index("unembeddable") == list(gallery).index("pending") + 1


def wait_until(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the replica did not converge in time"
        threading.Event().wait(0.01)


def test_the_backfill_thread_warns_once_across_its_passes(
    tmp_path: Path, database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two replicas of a shared store: every enrollment on the old model nudges the new model's backfill
    thread into a pass; the entry it cannot embed is offered once and warned about once across all of them,
    then once more after its wait."""
    caplog.set_level(logging.DEBUG, logger="centerid.gallery")
    model, clock = FakeModel(), FakeClock()
    replica = {"database_url": database, "follow_poll_s": 0.2}
    with (
        Gallery.open(tmp_path / "old", DIM, "old", **replica) as old,
        Gallery.open(tmp_path / "new", DIM, "new", **replica) as new,
    ):
        new.embed_backoff.clock = clock
        new.start_backfill(model)
        bad = old.add("a", VECTORS[BAD : BAD + 1], [b"%d" % BAD])[0].id
        wait_until(lambda: len(new.embed_backoff) == 1)
        for n in range(3):  # three more passes, each with a new entry it can embed
            old.add("b", VECTORS[n : n + 1], [b"%d" % n])
            wait_until(lambda n=n: new.size == n + 1)
        assert model.offered[BAD] == 1 and new.pending_reembed == 1 and len(new.embed_backoff) == 1
        clock.now += BACKFILL_POLL_S
        old.add("c", VECTORS[5:6], [b"5"])
        wait_until(lambda: new.size == 4)  # its pass offered BAD with it (and alone): due again
        assert model.offered[BAD] == 3 and new.pending_reembed == 1 and len(new.embed_backoff) == 1
        assert len(warnings_about(caplog, bad, logging.WARNING)) == 1
        assert len(warnings_about(caplog, bad, logging.DEBUG)) == 1


@pytest.mark.parametrize("error", [NotReady("the inference worker is not running"), Overloaded("queue full")])
def test_an_embedder_that_cannot_take_work_backs_off_no_entry(tmp_path: Path, error: Exception) -> None:
    """The embedder stopping or being full says nothing about the images: no entry is remembered as failed,
    and the error reaches the caller (the backfill loop logs it and tries again at its next pass)."""
    gallery, _, _ = upgraded_gallery(tmp_path)

    def unavailable(blobs: list[bytes]) -> np.ndarray:
        raise error

    with gallery:
        with pytest.raises(type(error)):
            gallery.reembed(unavailable, batch_size=4)
        assert len(gallery.embed_backoff) == 0 and gallery.pending_reembed == 9
        assert gallery.reembed(FakeModel(), batch_size=4) == 8  # the next pass: everything but BAD


def test_a_shared_store_gallery_dropped_without_close_leaves_no_thread_of_its_own(
    tmp_path: Path, database: str
) -> None:
    """Follower, backfill and builder hold the gallery only weakly: collecting it ends all three (daemon
    threads left waiting would keep the gallery, its index and its store reachable until the process ends)."""
    before = set(threading.enumerate())
    gallery = Gallery.open(tmp_path, DIM, "new", database_url=database, follow_poll_s=0.2)
    gallery.start_backfill(FakeModel())
    gallery.add("a", VECTORS[:2], [b"0", b"1"])
    started = {t for t in set(threading.enumerate()) - before if t.name.startswith("gallery-")}
    assert {t.name for t in started} == {"gallery-follower", "gallery-backfill", "gallery-rebuild"}
    store = gallery._db  # its connection pool is the store's, not the gallery's: closed below, by hand
    del gallery
    gc.collect()
    wait_until(lambda: not any(t.is_alive() for t in started), timeout=30.0)
    store.close()
