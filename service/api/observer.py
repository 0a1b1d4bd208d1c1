"""Per-slot work that no response waits for: the label-free estimates of a served slot (expected BER
from its LLRs, pilot SINR from its grid) go to the monitor and the metrics on one background thread.

Slots arrive a batch at a time (the batcher hands over each batch it ran). The thread takes every
queued batch, after waiting ``gather_s`` for more when it woke for a lone batch under 4 slots: at one
stream a batch is one slot, and a wake-up per slot cost more CPU than its estimates and took the
interpreter lock from the batcher mid-batch. It computes a group's estimates in one pass per pilot
layout and updates each context's window and gauges once per group, not once per slot. The queue is
bounded; when the thread falls behind, observations are dropped and counted
(``deeprx_slot_observations_dropped_total``): estimates are window means, a missing slot only thins
the window, and a response is never delayed for them.
"""
from __future__ import annotations

import queue
import threading
import time

import numpy as np

from service.monitoring.monitor import FeedbackMonitor
from service.monitoring.pilots import pilot_sinr_db
from service.serving.metrics import ServiceMetrics
from service.serving.slot import ReceivedSlot

_MAX_GROUP = 64  # batches taken from the queue at once
_GATHER_SLOTS = 4  # a lone batch smaller than this waits gather_s for company (one or two streams)


class SlotObserver:
    def __init__(self, monitor: FeedbackMonitor, metrics: ServiceMetrics, queue_size: int = 1024,  # batches
                 gather_s: float = 0.05):
        self.monitor = monitor
        self.metrics = metrics
        self.gather_s = gather_s
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="slot-observer", daemon=True)
        self._thread.start()

    def observe(self, slots: list[ReceivedSlot], llrs: list[np.ndarray]) -> None:
        """Queue the estimates of a batch of served slots (one queue item); never blocks."""
        try:
            self._queue.put_nowait(list(zip(slots, llrs)))
        except queue.Full:
            self.metrics.observations_dropped.inc(len(slots))

    def flush(self) -> None:
        """Wait until every slot observed so far has been recorded."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            if items[0] is not None and len(items[0]) < _GATHER_SLOTS and self._queue.qsize() == 0:
                time.sleep(self.gather_s)  # a sleep, not a wait on the queue, which would wake per batch
            while items[-1] is not None and len(items) < _MAX_GROUP:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = items[-1] is None  # close(): the marker is always last
            try:
                self._record([served for batch in (items[:-1] if stop else items) for served in batch])
            finally:
                for _ in items:
                    self._queue.task_done()
            if stop:
                return

    def _record(self, served: list[tuple[ReceivedSlot, np.ndarray]]) -> None:
        if not served:  # close() with nothing queued
            return
        estimates = np.empty((len(served), 2))
        estimates[:, 0] = expected_bit_error_rates([llrs for _, llrs in served])
        by_layout: dict[tuple, list[int]] = {}  # pilot SINR in one pass per pilot layout (checked at decode)
        for i, (slot, _) in enumerate(served):
            by_layout.setdefault((slot.pilots.shape, slot.dmrs_position), []).append(i)
        for rows in by_layout.values():
            estimates[rows, 1] = pilot_sinr_db(np.stack([served[i][0].grid for i in rows]),
                                               np.stack([served[i][0].pilots for i in rows]))
        by_context: dict[str, list[tuple[float, float]]] = {}
        for (slot, _), (expected_ber, sinr) in zip(served, estimates.tolist()):
            by_context.setdefault(self.metrics.context_label(slot.context), []).append((expected_ber, sinr))
        for label, context_estimates in by_context.items():
            means = self.monitor.record_estimates(label, context_estimates)
            self.metrics.context_ber_estimate.labels(label).set(means.expected_ber)
            self.metrics.context_pilot_sinr.labels(label).set(means.pilot_sinr_db)


def expected_bit_error_rates(llrs: list[np.ndarray]) -> np.ndarray:
    """Each slot's mean bit error probability if its LLRs are calibrated, 1 / (1 + e^|LLR|), in
    double precision over all the slots' LLRs at once."""
    flat = np.abs(np.concatenate([x.ravel() for x in llrs]).astype(np.float64))
    sizes = np.array([x.size for x in llrs])
    return np.add.reduceat(1.0 / (1.0 + np.exp(flat)), np.cumsum(sizes) - sizes) / sizes
