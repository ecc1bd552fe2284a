"""The one inference worker: a dedicated thread that batches concurrent requests into forward passes.

Requests put preprocessed tensors on a queue and await their own rows. The worker takes the first job
and whatever else is queued (never more than ``max_batch`` rows), runs one forward pass and hands each job
its slice back on the caller's event loop (``call_soon_threadsafe``). The model is only ever touched by
this thread, so inference never blocks the event loop and torch's thread pool is never shared by two
forward passes at once.

Waiting for company costs latency, so the worker waits (at most ``max_wait_ms``) only for requests that
have announced themselves (:meth:`Embedder.announce`: they are still decoding their uploads). A lone
request is run at once; under load, batches fill with the requests that were on their way.

Backpressure: a caller may bound the queue (``queue_limit`` rows: a full queue refuses with 503
``overloaded``) and give a deadline; a job whose deadline has passed is dropped before its forward pass
rather than computed for nobody. A batch whose forward pass fails is retried job by job, so one bad job
fails alone instead of failing every request that happened to share its batch.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from service.backends import Backend, TorchBackend
from service.errors import NotReady, Overloaded
from service.images import decode_image
from training.bundle import Bundle

logger = logging.getLogger("centerid.service")

BatchHook = Callable[[int, float], None]


@dataclass
class _Job:
    batch: torch.Tensor
    future: asyncio.Future[np.ndarray] | concurrent.futures.Future[np.ndarray]
    loop: asyncio.AbstractEventLoop | None
    deadline: float | None = None  # the embedder's clock time after which nobody wants the result

    @property
    def rows(self) -> int:
        return int(self.batch.shape[0])

    @property
    def abandoned(self) -> bool:
        """The caller stopped waiting (client gone, deadline passed on its side)."""
        return self.future.cancelled()

    def settle(self, result: np.ndarray | None, error: BaseException | None) -> None:
        if self.loop is None:
            assert isinstance(self.future, concurrent.futures.Future)
            if error is None:
                self.future.set_result(result)  # type: ignore[arg-type]
            else:
                self.future.set_exception(error)
            return
        with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody is waiting any more
            self.loop.call_soon_threadsafe(_settle_async, self.future, result, error)


def _settle_async(future: Any, result: np.ndarray | None, error: BaseException | None) -> None:
    if future.done():  # the request was cancelled (client went away)
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


_STOP = object()
_NUDGE = object()  # wakes a waiting worker when an announced request gives up before submitting


class Arrival:
    """A request on its way to the queue (see :meth:`Embedder.announce`); closed once it has submitted."""

    def __init__(self, embedder: Embedder) -> None:
        self.open = True
        self._embedder = embedder

    def close(self) -> None:
        """Give up without submitting (the upload did not decode): a waiting worker must stop waiting."""
        if self.open:
            self.open = False
            self._embedder._arrived(nudge=True)


class Embedder:
    """Batched, L2-normalised float32 embeddings from a bundle's model, computed on one worker thread."""

    def __init__(
        self,
        bundle: Bundle,
        max_batch: int = 32,
        max_wait_ms: float = 5.0,
        threads: int | None = None,
        on_batch: BatchHook | None = None,
        clock: Callable[[], float] = time.monotonic,
        backend: Backend | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.bundle = bundle
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.threads = threads
        self.on_batch = on_batch
        self.clock = clock
        self.backend: Backend = backend or TorchBackend(bundle)
        self.forward_passes = 0
        self.batch_sizes: Counter[int] = Counter()
        self._queue: queue.Queue[Any] = queue.Queue()
        self._queued_rows = 0
        self._arriving = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopped = False

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> Embedder:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="centerid-inference", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in flight, fail whatever is still queued, and join the worker."""
        self._stopped = True
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(job, _Job):
                job.settle(None, NotReady("the service is shutting down"))

    def __enter__(self) -> Embedder:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    @property
    def queue_depth(self) -> int:
        """Images waiting for a forward pass."""
        return self._queued_rows

    # -- submission --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def announce(self) -> Iterator[Arrival]:
        """Tell the worker a request is coming (wrap decoding + ``embed(..., arrival)``), so that a batch
        being formed waits for it rather than leaving without it."""
        with self._lock:
            self._arriving += 1
        arrival = Arrival(self)
        try:
            yield arrival
        finally:
            arrival.close()

    def _arrived(self, nudge: bool) -> None:
        with self._lock:
            self._arriving -= 1
            idle = self._arriving == 0
        if idle and nudge:
            self._queue.put(_NUDGE)

    async def embed(
        self,
        batch: torch.Tensor,
        arrival: Arrival | None = None,
        deadline: float | None = None,
        queue_limit: int | None = None,
    ) -> np.ndarray:
        """Embed a preprocessed N×C×H×W batch; awaits this request's N rows.

        ``deadline`` (a :attr:`clock` time) bounds the wait: past it the request fails with Overloaded and
        its job, if still queued, is dropped unrun. ``queue_limit`` refuses the job (Overloaded) when the
        queue already holds images and this job would take it past that many rows.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._submit(_Job(batch, future, loop, deadline), arrival, queue_limit)
        if deadline is None:
            return await future
        try:
            return await asyncio.wait_for(future, timeout=max(0.0, deadline - self.clock()))
        except TimeoutError:
            raise Overloaded("the request's deadline passed while it waited for inference") from None

    def embed_sync(self, batch: torch.Tensor) -> np.ndarray:
        """Blocking variant for code outside an event loop (re-embedding, scripts)."""
        future: concurrent.futures.Future[np.ndarray] = concurrent.futures.Future()
        self._submit(_Job(batch, future, None))
        return future.result()

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded Pillow images → embeddings, preprocessed by the bundle's own Preprocessor."""
        return self.embed_sync(self.bundle.preprocess.batch(images))

    def embed_bytes(self, blobs: Sequence[bytes], max_bytes: int = 1 << 40, max_pixels: int = 1 << 40) -> np.ndarray:
        """Encoded image files → embeddings (what the gallery's re-embedding and bootstrap scripts need)."""
        preprocess = self.bundle.preprocess
        images = [decode_image(blob, f"image[{i}]", max_bytes, max_pixels, preprocess) for i, blob in enumerate(blobs)]
        return self.embed_images(images)

    def warmup(self) -> None:
        """Run the first (slow, allocating) forward passes before traffic arrives."""
        spec = self.bundle.preprocess.spec
        for size in sorted({1, self.max_batch}):
            self.embed_sync(torch.zeros(size, spec.channels, spec.height, spec.width))

    def _submit(self, job: _Job, arrival: Arrival | None = None, queue_limit: int | None = None) -> None:
        if self._stopped or self._thread is None:
            raise NotReady("the inference worker is not running")
        if job.batch.ndim != 4 or job.batch.shape[0] == 0:
            raise ValueError(f"expected a non-empty N×C×H×W batch, got shape {tuple(job.batch.shape)}")
        with self._lock:  # the job itself wakes the worker: no nudge, no extra thread switch
            waiting = self._queued_rows
            if queue_limit is not None and waiting > 0 and waiting + job.rows > queue_limit:
                raise Overloaded(f"the inference queue is full ({waiting} images waiting, limit {queue_limit})")
            self._queued_rows += job.rows
            if arrival is not None and arrival.open:
                arrival.open = False
                self._arriving -= 1
            self._queue.put(job)

    # -- worker ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        held: Any = None
        while True:
            first = held if held is not None else self._queue.get()
            held = None
            if first is _STOP:
                return
            if first is _NUDGE:
                continue
            jobs, held = self._gather(first)
            self._process(jobs)

    def _gather(self, first: _Job) -> tuple[list[_Job], Any]:
        """Add queued jobs to ``first`` up to max_batch rows, waiting (until max_wait) only while announced
        requests are still on their way; returns (jobs, job held back for the next batch)."""
        jobs, rows = [first], first.batch.shape[0]
        deadline = time.monotonic() + self.max_wait
        while rows < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if self._arriving <= 0 or remaining <= 0:
                    break
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if job is _NUDGE:
                continue
            if job is _STOP or rows + job.batch.shape[0] > self.max_batch:
                return jobs, job
            jobs.append(job)
            rows += job.batch.shape[0]
        return jobs, None

    def _process(self, jobs: list[_Job]) -> None:
        with self._lock:
            self._queued_rows -= sum(job.rows for job in jobs)
        jobs = self._drop_expired(jobs)
        if not jobs:
            return
        try:
            embeddings = self._forward(self._stack(jobs))
        except Exception as error:
            if len(jobs) == 1:
                logger.exception("forward pass failed for %d images", jobs[0].rows)
                jobs[0].settle(None, error)
                return
            logger.warning("forward pass of %d jobs failed (%s): retrying them one by one", len(jobs), error)
            for job in jobs:
                self._process_alone(job)
            return
        offset = 0
        for job in jobs:
            job.settle(embeddings[offset : offset + job.rows], None)
            offset += job.rows

    def _stack(self, jobs: list[_Job]) -> np.ndarray:
        """The jobs' rows as one float32 batch: a lone job's own tensor (no copy), else one ``torch.cat``.

        Not a reused max_batch buffer: copying each job's rows into one cost 4-6× a single concatenation
        (a torch op per job; the fresh allocation is cheap next to the copy; docs/benchmarks_service.md), and
        no array a backend was given is ever rewritten by a later batch."""
        if len(jobs) == 1:
            return jobs[0].batch.float().contiguous().numpy()
        return torch.cat([job.batch for job in jobs]).float().numpy()

    def _process_alone(self, job: _Job) -> None:
        try:
            job.settle(self._forward(self._stack([job])), None)
        except Exception as error:
            logger.exception("forward pass failed for %d images", job.rows)
            job.settle(None, error)

    def _drop_expired(self, jobs: list[_Job]) -> list[_Job]:
        """Jobs still worth a forward pass; the others are settled (or, if abandoned, just forgotten)."""
        now = self.clock()
        live = []
        for job in jobs:
            if job.abandoned:
                continue
            if job.deadline is not None and now >= job.deadline:
                job.settle(None, Overloaded("the request's deadline passed before its forward pass"))
                continue
            live.append(job)
        return live

    def _forward(self, batch: np.ndarray) -> np.ndarray:
        outputs = []
        for start in range(0, batch.shape[0], self.max_batch):  # one oversized request still respects max_batch
            chunk = batch[start : start + self.max_batch]
            started = time.perf_counter()
            outputs.append(self.backend(chunk))
            self.forward_passes += 1
            self.batch_sizes[chunk.shape[0]] += 1
            if self.on_batch is not None:
                self.on_batch(chunk.shape[0], time.perf_counter() - started)
        return np.ascontiguousarray(np.concatenate(outputs), dtype=np.float32)
