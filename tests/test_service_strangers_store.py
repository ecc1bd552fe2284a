"""service.strangers: the operator's stranger store on its own (SQLite beside the gallery)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.strangers import StrangerError, StrangerStore

DIM = 4


def vectors(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)


def test_added_strangers_survive_reopening_normalised_and_in_order(tmp_path: Path) -> None:
    raw = vectors(3)
    store = StrangerStore.open(tmp_path, DIM, "model-a", max_entries=10)
    entries = store.add("visitor", raw, [b"a", b"b", b"c"])
    store.close()
    again = StrangerStore.open(tmp_path, DIM, "model-a", max_entries=10)
    stored, labels = again.vectors()
    np.testing.assert_allclose(stored, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    assert labels == ["visitor"] * 3 and [e.id for e in again.entries()] == [e.id for e in entries]
    assert again.delete(entries[0].id) and not again.delete(entries[0].id) and again.count() == 2


def test_bounds_and_bad_input_are_refused_without_writing(tmp_path: Path) -> None:
    store = StrangerStore.open(tmp_path, DIM, "model-a", max_entries=4)
    store.add("a", vectors(3), [b"x"] * 3)
    with pytest.raises(StrangerError, match="at most 4"):
        store.add("b", vectors(2), [b"x"] * 2)
    with pytest.raises(StrangerError, match="NaN"):
        store.add("b", np.full((1, DIM), np.nan, np.float32), [b"x"])
    with pytest.raises(StrangerError, match="dimension"):
        store.add("b", np.zeros((1, DIM + 1), np.float32), [b"x"])
    with pytest.raises(StrangerError, match="label"):
        store.add(" b", vectors(1), [b"x"])
    assert store.count() == 3  # nothing of the refused adds was written


def test_a_new_model_reembeds_the_stored_images(tmp_path: Path) -> None:
    store = StrangerStore.open(tmp_path, DIM, "model-a", max_entries=10)
    store.add("a", vectors(2), [b"one", b"two"])
    store.close()
    upgraded = StrangerStore.open(tmp_path, DIM, "model-b", max_entries=10)
    assert upgraded.pending_reembed == 2 and len(upgraded.vectors()[0]) == 0  # never mixes two models

    def embed(images: list[bytes]) -> np.ndarray:
        return np.array([[len(image), 1, 0, 0] for image in images], dtype=np.float32)

    assert upgraded.reembed(embed, batch_size=1) == 2 and upgraded.pending_reembed == 0
    expected = np.array([[3, 1, 0, 0], [3, 1, 0, 0]], np.float32) / np.sqrt(10)
    np.testing.assert_allclose(upgraded.vectors()[0], expected, atol=1e-6)
