"""Dynamic batching: slots from concurrent requests and streams share model forward passes.

Each submitted slot carries the :class:`ModelVersion` its request started on; a batch only mixes
slots of the same version and grid shape, so a hot swap never changes the model under a request.
One worker thread runs the model; a batch closes when it is full or when its oldest slot has
waited ``max_queue_delay_s``.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from service.serving.metrics import ServiceMetrics
from service.serving.registry import ModelVersion


@dataclass(eq=False)
class _Pending:
    features: torch.Tensor  # [C, F, S]
    bits_per_symbol: int
    version: ModelVersion
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple:
        return (self.version.version, tuple(self.features.shape))


class BatcherClosed(RuntimeError):
    """Raised by submit() after close(): the server is shutting down."""


class DynamicBatcher:
    def __init__(self, metrics: ServiceMetrics, max_batch_size: int = 64, max_queue_delay_s: float = 0.002):
        self.metrics = metrics
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_s
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="deeprx-batcher", daemon=True)
        self._worker.start()

    def submit(self, features: torch.Tensor, bits_per_symbol: int, version: ModelVersion) -> Future:
        """Queue one featurized slot; the future resolves to its logits [6, F, S] (CPU)."""
        pending = _Pending(features, bits_per_symbol, version)
        with self._lock:
            if self._closed:
                raise BatcherClosed("server is shutting down")
            self._queue.put(pending)
        return pending.future

    def close(self) -> None:
        """Finish everything queued, then stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._worker.join()

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
        start = time.perf_counter()
        for item in batch:
            self.metrics.queue_delay_seconds.observe(start - item.enqueued)
        try:
            model = batch[0].version.model
            device = next(model.parameters()).device
            features = torch.stack([p.features for p in batch]).to(device)
            k = torch.tensor([p.bits_per_symbol for p in batch], device=device)
            with torch.inference_mode():
                logits = model(features, k).float().cpu()
        except Exception as err:  # noqa: BLE001 - every waiting request must learn of the failure
            for item in batch:
                item.future.set_exception(err)
            return
        self.metrics.inference_seconds.observe(time.perf_counter() - start)
        self.metrics.batch_size.observe(len(batch))
        for item, result in zip(batch, logits):
            item.future.set_result(result)
