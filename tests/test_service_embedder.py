"""The inference worker: concurrent requests share forward passes without changing any embedding; torch and
FAISS (two OpenMP runtimes) coexist in one process whatever the import order."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, orl_bytes, orl_image, service_client

from service.embedder import Embedder
from service.errors import NotReady, Overloaded
from training.bundle import load_bundle


@pytest.fixture(scope="module")
def faces(bundle_dir: Path) -> torch.Tensor:
    bundle = load_bundle(bundle_dir)
    return bundle.preprocess.batch([orl_image(i, j) for i in range(31, 35) for j in range(1, 7)])  # 24 faces


def one_by_one(bundle_dir: Path, faces: torch.Tensor) -> np.ndarray:
    with Embedder(load_bundle(bundle_dir), max_batch=1, max_wait_ms=0, threads=1) as embedder:
        rows = [embedder.embed_sync(faces[i : i + 1]) for i in range(len(faces))]
        assert embedder.forward_passes == len(faces) and embedder.batch_sizes == {1: len(faces)}
    return np.concatenate(rows)


def test_concurrent_requests_share_forward_passes(bundle_dir: Path, faces: torch.Tensor) -> None:
    reference = one_by_one(bundle_dir, faces)

    async def burst(embedder: Embedder) -> list[np.ndarray]:
        with contextlib.ExitStack() as stack:  # 24 requests announce themselves, as the routes do
            arrivals = [stack.enter_context(embedder.announce()) for _ in range(len(faces))]
            return await asyncio.gather(*(embedder.embed(faces[i : i + 1], arrivals[i]) for i in range(len(faces))))

    with Embedder(load_bundle(bundle_dir), max_batch=8, max_wait_ms=500, threads=1) as embedder:
        rows = asyncio.run(burst(embedder))
        assert embedder.forward_passes < len(faces)
        assert max(embedder.batch_sizes) <= 8
        assert sum(size * n for size, n in embedder.batch_sizes.items()) == len(faces)
    np.testing.assert_allclose(np.concatenate(rows), reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(reference, axis=1), 1.0, atol=1e-6)
    assert reference.dtype == np.float32


def test_a_lone_request_does_not_wait_but_an_announced_one_is_waited_for(bundle_dir: Path, faces: torch.Tensor) -> None:
    """No sleeps: a job taken off the queue while another request is announced must still be open to
    company — a job submitted after the worker took the first one joins its batch — and the batch leaves
    as soon as the announced request gives up."""

    async def scenario(embedder: Embedder) -> np.ndarray:
        alone = await asyncio.wait_for(embedder.embed(faces[:1]), 60)  # max_wait is 10 minutes
        with embedder.announce():  # a request still decoding, which will fail and never submit
            first = asyncio.create_task(embedder.embed(faces[1:2]))
            await until(lambda: embedder._queue.qsize() == 0 and embedder.queue_depth == 1)  # taken, not run
            second = asyncio.create_task(embedder.embed(faces[2:3]))
            await until(lambda: embedder._queue.qsize() == 0 and embedder.queue_depth == 2)  # joined it
            assert not first.done()
        rows = await asyncio.wait_for(asyncio.gather(first, second), 60)  # the give-up ends the wait
        return np.concatenate([alone, *rows])

    with Embedder(load_bundle(bundle_dir), max_batch=8, max_wait_ms=600_000, threads=1) as embedder:
        rows = asyncio.run(scenario(embedder))
        assert embedder.batch_sizes == {1: 1, 2: 1}  # the lone one alone, then the two together
    np.testing.assert_allclose(rows, one_by_one(bundle_dir, faces)[:3], atol=1e-5)


async def until(condition: Callable[[], bool]) -> None:
    """Yield to the loop until ``condition()`` holds (the worker runs on its own thread meanwhile)."""
    for _ in range(1_000_000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


def test_multi_image_jobs_are_never_split_and_big_ones_are_chunked(bundle_dir: Path, faces: torch.Tensor) -> None:
    reference = one_by_one(bundle_dir, faces)

    async def mixed(embedder: Embedder) -> list[np.ndarray]:
        return await asyncio.gather(embedder.embed(faces[:3]), embedder.embed(faces[3:20]), embedder.embed(faces[20:]))

    with Embedder(load_bundle(bundle_dir), max_batch=8, max_wait_ms=20, threads=1) as embedder:
        first, big, last = asyncio.run(mixed(embedder))
        assert max(embedder.batch_sizes) <= 8
    np.testing.assert_allclose(np.concatenate([first, big, last]), reference, atol=1e-5)


def test_concurrent_http_requests_batch(bundle_dir: Path, tmp_path: Path) -> None:
    images = [(i, j) for i in range(31, 35) for j in range(1, 5)]
    with service_client(bundle_dir, tmp_path, max_batch=16, max_wait_ms=100) as client:
        sequential = [client.post("/embed", files={"files": orl_bytes(*image)}).json() for image in images]
        embedder = client.app.state.service.embedder
        before = embedder.forward_passes

        def post(image: tuple[int, int]) -> dict:
            return client.post("/embed", files={"files": orl_bytes(*image)}).json()

        with ThreadPoolExecutor(len(images)) as pool:
            concurrent = list(pool.map(post, images))
        assert embedder.forward_passes - before < len(images)
    for alone, together in zip(sequential, concurrent, strict=True):
        np.testing.assert_allclose(alone["embeddings"], together["embeddings"], atol=1e-5)


def test_stopped_worker_refuses_work(bundle_dir: Path, faces: torch.Tensor) -> None:
    embedder = Embedder(load_bundle(bundle_dir), max_batch=4).start()
    embedder.stop()
    with pytest.raises(NotReady):
        embedder.embed_sync(faces[:1])


def test_forward_errors_reach_the_caller(bundle_dir: Path) -> None:
    with Embedder(load_bundle(bundle_dir), max_batch=4) as embedder:
        with pytest.raises(RuntimeError):
            embedder.embed_sync(torch.zeros(1, 3, 5, 5))  # wrong channels and size for the model
        with pytest.raises(ValueError, match="N×C×H×W"):
            embedder.embed_sync(torch.zeros(3, 28, 24))
        assert embedder.embed_bytes([orl_bytes(1, 1)]).shape == (1, embedder.bundle.feat_dim)  # still alive


PROBE = """
import threading
{imports}
import numpy as np
torch.set_num_threads(2)
faiss.omp_set_num_threads(2)
index = faiss.IndexFlatIP(64)
index.add(np.random.default_rng(0).random((20000, 64), dtype=np.float32))
model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3))
errors = []
def forward():
    try:
        for _ in range(20):
            with torch.inference_mode():
                model(torch.rand(16, 1, 56, 48))
    except BaseException as error:
        errors.append(error)
def search():
    try:
        faiss.omp_set_num_threads(2)
        for _ in range(20):
            index.search(np.random.default_rng(1).random((64, 64), dtype=np.float32), 5)
    except BaseException as error:
        errors.append(error)
threads = [threading.Thread(target=f) for f in (forward, search, forward, search)]
for t in threads: t.start()
for t in threads: t.join()
assert not errors, errors
print("ok", torch.get_num_threads(), faiss.omp_get_max_threads())
"""


@pytest.mark.parametrize("imports", ["import faiss\nimport torch", "import torch\nimport faiss"])
def test_torch_and_faiss_together_neither_crash_nor_deadlock(imports: str) -> None:
    code = textwrap.dedent(PROBE.format(imports=imports))
    env = {"PATH": "/usr/bin:/bin"}  # no KMP_DUPLICATE_LIB_OK or OMP_* help from the environment
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "2", "2"]


# -- backpressure: bounded queue, deadlines, one bad job fails alone ----------------------------------------
class GatedModel(torch.nn.Module):
    """Wraps the bundle's model: the first forward pass blocks until ``release`` (so that the test decides
    what is queued behind it), and any batch holding a row marked with POISON raises."""

    POISON = 1234.0

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.started, self.release = threading.Event(), threading.Event()
        self.batches: list[int] = []

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.started.set()
        assert self.release.wait(60), "the test never released the worker"
        self.batches.append(batch.shape[0])
        if (batch == self.POISON).flatten(1).all(dim=1).any():
            raise RuntimeError("poisoned row")
        return self.model(batch)


def gated_embedder(bundle_dir: Path, **options: object) -> tuple[Embedder, GatedModel]:
    bundle = load_bundle(bundle_dir)
    gate = GatedModel(bundle.model)
    bundle.model = gate
    return Embedder(bundle, threads=1, **options), gate  # type: ignore[arg-type]


def test_one_failing_job_fails_alone_and_its_batch_mates_succeed(bundle_dir: Path, faces: torch.Tensor) -> None:
    reference = one_by_one(bundle_dir, faces)[:4]
    poison = torch.full_like(faces[:1], GatedModel.POISON)

    async def scenario(embedder: Embedder, gate: GatedModel) -> list[object]:
        first = asyncio.create_task(embedder.embed(faces[:1]))
        await asyncio.to_thread(gate.started.wait, 60)  # the worker is busy: the next jobs queue up together
        queued = [embedder.embed(faces[1:3]), embedder.embed(poison), embedder.embed(faces[3:4])]
        tasks = [asyncio.create_task(job) for job in queued]
        await until_queued(embedder, 4)
        gate.release.set()
        return [await first, *await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)]

    embedder, gate = gated_embedder(bundle_dir, max_batch=8, max_wait_ms=0)
    with embedder:
        first, pair, failed, last = asyncio.run(scenario(embedder, gate))
    assert gate.batches == [1, 4, 2, 1, 1]  # the batch of 4 failed, then each job ran alone
    assert isinstance(failed, RuntimeError) and "poisoned" in str(failed)
    np.testing.assert_allclose(np.concatenate([first, pair, last]), reference, atol=1e-5)  # type: ignore[list-item]


async def until_queued(embedder: Embedder, rows: int) -> None:
    await until(lambda: embedder.queue_depth == rows)


def test_a_full_queue_refuses_with_503(bundle_dir: Path, faces: torch.Tensor) -> None:
    async def scenario(embedder: Embedder, gate: GatedModel) -> None:
        first = asyncio.create_task(embedder.embed(faces[:1]))
        await asyncio.to_thread(gate.started.wait, 60)
        waiting = asyncio.create_task(embedder.embed(faces[1:4], queue_limit=4))  # 3 rows: fits
        await until_queued(embedder, 3)
        with pytest.raises(Overloaded, match="inference queue is full \\(3 images waiting, limit 4\\)") as refused:
            await embedder.embed(faces[4:6], queue_limit=4)  # 3 + 2 > 4
        assert refused.value.headers == {"Retry-After": "1"}
        assert embedder.queue_depth == 3  # the refused job was not counted
        gate.release.set()
        await asyncio.gather(first, waiting)
        big = await embedder.embed(faces[:6], queue_limit=4)  # an empty queue takes one job of any size
        assert big.shape[0] == 6

    embedder, gate = gated_embedder(bundle_dir, max_batch=8, max_wait_ms=0)
    with embedder:
        asyncio.run(scenario(embedder, gate))


def test_a_job_past_its_deadline_is_dropped_before_its_forward(bundle_dir: Path, faces: torch.Tensor) -> None:
    now = [0.0]

    async def scenario(embedder: Embedder, gate: GatedModel) -> None:
        first = asyncio.create_task(embedder.embed(faces[:1]))
        await asyncio.to_thread(gate.started.wait, 60)
        late = asyncio.create_task(embedder.embed(faces[1:3], deadline=50.0))  # real wait bound: 50 s
        on_time = asyncio.create_task(embedder.embed(faces[3:4], deadline=500.0))
        await until_queued(embedder, 3)
        now[0] = 100.0  # the clock passes the first deadline while the worker is busy
        gate.release.set()
        with pytest.raises(Overloaded, match="deadline passed before its forward pass"):
            await late
        assert (await on_time).shape == (1, embedder.bundle.feat_dim)
        await first

    embedder, gate = gated_embedder(bundle_dir, max_batch=8, max_wait_ms=0, clock=lambda: now[0])
    with embedder:
        asyncio.run(scenario(embedder, gate))
    assert gate.batches == [1, 1]  # the late job's two rows never reached the model
    assert embedder.queue_depth == 0


# -- batch assembly: what the backend is given, batch after batch --------------------------------------------
class SteppedBackend:
    """Wraps the real backend: records every batch it is given (the array itself and a copy) and blocks each
    call until the test grants a permit, so that the test decides which jobs queue up behind it."""

    def __init__(self, real: Callable[[np.ndarray], np.ndarray]) -> None:
        self.real = real
        self.name = "stepped"
        self.permits = threading.Semaphore(0)
        self.given: list[np.ndarray] = []
        self.copies: list[np.ndarray] = []
        self.outputs: list[np.ndarray] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.given.append(batch)
        self.copies.append(batch.copy())
        assert self.permits.acquire(timeout=60), "the test never let the batch run"
        self.outputs.append(self.real(batch))
        return self.outputs[-1]


def test_batches_of_different_sizes_in_sequence_match_each_job_alone(bundle_dir: Path, faces: torch.Tensor) -> None:
    """A batch of 8 rows (three jobs), then 2 (two jobs), then 3 (one job): each batch the backend is given
    holds exactly its jobs' rows (a smaller batch never carries rows of the bigger one before it), each job's
    rows are the one-at-a-time embeddings, and no answer changes when later batches run."""
    groups = [[(0, 1)], [(1, 4), (4, 7), (7, 9)], [(9, 10), (10, 11)], [(11, 14)]]  # row ranges of faces
    reference = one_by_one(bundle_dir, faces)

    async def scenario(embedder: Embedder, backend: SteppedBackend) -> list[np.ndarray]:
        running = [asyncio.create_task(embedder.embed(faces[a:b])) for a, b in groups[0]]
        await until(lambda: len(backend.given) == 1)  # the worker holds the first batch
        answers: list[np.ndarray] = []
        for number, group in enumerate(groups[1:], start=2):
            queued = [asyncio.create_task(embedder.embed(faces[a:b])) for a, b in group]
            rows = sum(b - a for a, b in group)
            await until(lambda rows=rows: embedder.queue_depth == rows)  # all queued behind the running batch
            backend.permits.release()
            answers += [await asyncio.wait_for(task, 60) for task in running]
            await until(lambda number=number: len(backend.given) == number)  # gathered as one batch
            running = queued
        backend.permits.release()
        return answers + [await asyncio.wait_for(task, 60) for task in running]

    embedder = Embedder(load_bundle(bundle_dir), max_batch=8, max_wait_ms=0, threads=1)
    backend = SteppedBackend(embedder.backend)
    embedder.backend = backend  # type: ignore[assignment]
    with embedder:
        answers = asyncio.run(scenario(embedder, backend))
    assert [len(batch) for batch in backend.given] == [1, 8, 2, 3]
    expected_inputs = [faces[group[0][0] : group[-1][1]].numpy() for group in groups]
    for given, copy, expected in zip(backend.given, backend.copies, expected_inputs, strict=True):
        assert np.array_equal(copy, expected)  # exactly its jobs' rows when the backend got it
        assert np.array_equal(given, expected)  # and still, after every later batch ran
    jobs = [pair for group in groups for pair in group]
    for (a, b), answer in zip(jobs, answers, strict=True):
        np.testing.assert_allclose(answer, reference[a:b], atol=1e-5)
    assert np.array_equal(np.concatenate(answers), np.concatenate(backend.outputs))  # the backend's rows, unchanged
    assert not any(np.shares_memory(answer, given) for answer in answers for given in backend.given)
