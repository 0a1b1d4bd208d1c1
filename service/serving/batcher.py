"""Dynamic batching: slots from concurrent requests and streams share one featurization and one
backend forward pass.

Each submitted slot carries the :class:`ModelVersion` that serves its context at arrival; a batch only
mixes slots of the same version, grid shape and DMRS layout: a hot swap never changes the model under
a slot, and a batch is featurized in one call (a batch of both layouts took two, each paying the
call's fixed ~0.35 ms). A worker thread featurizes the batch (one call, not one per slot), runs the
version's backend and cuts each slot's LLRs out of the batch output; a batch closes when it is full
or when its oldest slot has waited ``max_queue_delay_s`` (0, the default: as soon as the queue is
empty, so a batch is whatever queued while the previous one ran). Several workers take batches from one queue and run
them at once (a stream still sends its results in request order). A slot submitted with an asyncio
future (``StreamDetect`` on the server's event loop) is resolved on its loop, one wake-up of the loop
per batch rather than one per slot.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from service.receiver.features import featurize
from service.serving.metrics import ServiceMetrics
from service.serving.registry import ModelVersion
from service.serving.slot import ReceivedSlot
from service.serving.threads import start_pinned_thread

log = logging.getLogger("deeprx.batcher")


@dataclass(eq=False)
class _Pending:
    slot: ReceivedSlot
    version: ModelVersion
    future: Future | asyncio.Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple:
        return (self.version.version, self.slot.grid.shape, self.slot.dmrs_position)


class BatcherClosed(RuntimeError):
    """Raised by submit() after close(): the server is shutting down."""


class BatcherFull(RuntimeError):
    """Raised by submit() when ``max_queued`` slots already wait: the caller is told to back off."""


def llrs_of_batch(slots: list[ReceivedSlot], logits: torch.Tensor) -> list[np.ndarray]:
    """Each slot's LLRs at its data REs in grid order (symbol-major), [data REs, bits per symbol]."""
    per_re = logits.permute(0, 3, 2, 1).numpy()  # [B, S, F, 6]
    return [per_re[i][slot.data_mask, :slot.bits_per_symbol] for i, slot in enumerate(slots)]


def run_batch(slots: list[ReceivedSlot], version: ModelVersion, run_layout=None,
              featurized: Callable[[float], None] | None = None) -> list[np.ndarray]:
    """Featurize ``slots`` (one grid shape) together and run ``version`` on them: the LLRs per slot.
    ``run_layout``: how each layout's slots are featurized (``features.featurize``; the server passes
    the ONNX Runtime featurizer when it serves with ONNX Runtime). ``featurized(seconds)`` is told
    how long featurizing took."""
    start = time.perf_counter()
    k = torch.tensor([s.bits_per_symbol for s in slots])
    with torch.inference_mode():  # no autograd bookkeeping per op (featurizing in torch: 0.68 -> 0.57 ms a slot)
        features = featurize(torch.from_numpy(np.stack([s.grid for s in slots])),
                             torch.from_numpy(np.stack([s.pilots for s in slots])),
                             torch.tensor([s.noise_variance for s in slots], dtype=torch.float32), k, run_layout)
    if featurized is not None:
        featurized(time.perf_counter() - start)
    return llrs_of_batch(slots, version.backend(features, k))


class DynamicBatcher:
    def __init__(self, metrics: ServiceMetrics, max_batch_size: int = 64, max_queue_delay_s: float = 0.0,
                 max_queued: int = 4096, torch_threads: int = 1, workers: int = 1,
                 on_batch: Callable[[list[ReceivedSlot], ModelVersion, list[np.ndarray]], None] | None = None,
                 featurizer: Callable | None = None):
        """``on_batch(slots, version, llrs)`` runs on the worker for every batch that ran, before any of
        its futures resolves: per-batch bookkeeping (what was served, capture, estimates) there costs
        one call per batch instead of work on the response path per slot. ``featurizer``: ``run_batch``'s
        ``run_layout``."""
        self.metrics = metrics
        self._featurizer = featurizer
        self._on_batch = on_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self.max_queued = max_queued
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._queued = 0  # submitted slots whose batch has not run yet
        self._closed = False
        self._lock = threading.Lock()
        # torch_threads: each worker's torch CPU threads (0: one per core); more than one only pays for
        # eager PyTorch on the CPU (ONNX Runtime has threads of its own)
        self._workers = [start_pinned_thread(self._run, f"deeprx-batcher-{i}", torch_threads)[0] for i in range(workers)]

    def submit(self, slot: ReceivedSlot, version: ModelVersion,
               future: asyncio.Future | None = None) -> Future | asyncio.Future:
        """Queue one validated slot; the future resolves to its LLRs [data REs, bits per symbol]. Pass
        ``future``, an asyncio future of the caller's running loop, to have it resolved on that loop."""
        pending = _Pending(slot, version, Future() if future is None else future)
        with self._lock:
            if self._closed:
                raise BatcherClosed("server is shutting down")
            if self._queued >= self.max_queued:
                raise BatcherFull(f"server busy: {self._queued} slots already queued (limits.max_queued_slots)")
            self._queued += 1
            self._queue.put(pending)
        return pending.future

    def close(self) -> None:
        """Finish everything queued, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._workers:  # each worker stops at the first marker it takes
                self._queue.put(None)
        for worker in self._workers:
            worker.join()

    def _fill(self, batch: list[_Pending], carry: list[_Pending]) -> bool:
        """Add queued slots compatible with ``batch[0]`` until full or its deadline; others go to
        ``carry``. Returns True when the stop marker was seen."""
        deadline = batch[0].enqueued + self.max_queue_delay_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False
            if item is None:
                return True
            (batch if item.key == batch[0].key else carry).append(item)
        return False

    def _run(self) -> None:
        carry: list[_Pending] = []  # slots taken from the queue that did not fit the last batch
        stop = False
        while carry or not stop:
            if carry:
                first = carry.pop(0)
            else:
                first = self._queue.get()
                if first is None:
                    stop = True
                    continue
            batch = [first] + [p for p in carry if p.key == first.key][: self.max_batch_size - 1]
            carry = [p for p in carry if all(p is not b for b in batch)]
            if not stop:
                stop = self._fill(batch, carry)
            self._forward(batch)

    def _forward(self, batch: list[_Pending]) -> None:
        with self._lock:
            self._queued -= len(batch)
        start = time.perf_counter()
        for item in batch:
            self.metrics.queue_delay_seconds.observe(start - item.enqueued)
        slots = [p.slot for p in batch]
        try:
            results = run_batch(slots, batch[0].version, self._featurizer, self.metrics.featurize_seconds.observe)
        except Exception as err:  # noqa: BLE001 - every waiting request must learn of the failure
            _resolve(batch, [err] * len(batch))
            return
        self.metrics.inference_seconds.observe(time.perf_counter() - start)
        self.metrics.batch_size.observe(len(batch))
        if self._on_batch is not None:
            try:
                self._on_batch(slots, batch[0].version, results)
            except Exception:  # noqa: BLE001 - bookkeeping must not keep the results from their requests
                log.exception("recording a served batch failed")
        _resolve(batch, results)


def _resolve(batch: list[_Pending], outcomes: list) -> None:
    """Give each waiting slot its outcome (LLRs or an exception); asyncio futures in one callback per loop."""
    on_loops: dict[asyncio.AbstractEventLoop, list] = {}
    for item, outcome in zip(batch, outcomes):
        if isinstance(item.future, asyncio.Future):
            on_loops.setdefault(item.future.get_loop(), []).append((item.future, outcome))
        elif item.future.set_running_or_notify_cancel():  # False: its request was cancelled, nobody waits
            _settle(item.future, outcome)
    for loop, settled in on_loops.items():
        try:
            loop.call_soon_threadsafe(_settle_all, settled)
        except RuntimeError:  # the loop has closed: its streams are gone
            pass


def _settle_all(settled: list) -> None:
    for future, outcome in settled:
        if not future.done():  # done: its stream was cancelled
            _settle(future, outcome)


def _settle(future: Future | asyncio.Future, outcome) -> None:
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
