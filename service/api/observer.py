"""Per-slot work that no response waits for: the label-free estimates of a served slot (expected BER
from its LLRs, pilot SINR from its grid) go to the monitor and the metrics on one background thread.

The thread takes every queued slot at once and updates each context's window and gauges once per
such group, not once per slot. The queue is bounded; when the thread falls behind, observations are
dropped and counted (``deeprx_slot_observations_dropped_total``): estimates are window means, a
missing slot only thins the window, and a response is never delayed for them.
"""
from __future__ import annotations

import queue
import threading

import numpy as np

from service.monitoring.monitor import FeedbackMonitor
from service.monitoring.pilots import pilot_sinr_db
from service.serving.metrics import ServiceMetrics
from service.serving.slot import ReceivedSlot

_MAX_GROUP = 256  # slots taken from the queue at once


class SlotObserver:
    def __init__(self, monitor: FeedbackMonitor, metrics: ServiceMetrics, queue_size: int = 4096):
        self.monitor = monitor
        self.metrics = metrics
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="slot-observer", daemon=True)
        self._thread.start()

    def observe(self, slot: ReceivedSlot, llrs: np.ndarray) -> None:
        """Queue a served slot's estimates; never blocks."""
        try:
            self._queue.put_nowait((slot, llrs))
        except queue.Full:
            self.metrics.observations_dropped.inc()

    def flush(self) -> None:
        """Wait until every slot observed so far has been recorded."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while True:
            items = [self._queue.get()]
            while items[-1] is not None and len(items) < _MAX_GROUP:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = items[-1] is None  # close(): the marker is always last
            try:
                self._record(items[:-1] if stop else items)
            finally:
                for _ in items:
                    self._queue.task_done()
            if stop:
                return

    def _record(self, served: list[tuple[ReceivedSlot, np.ndarray]]) -> None:
        by_context: dict[str, list[tuple[float, float]]] = {}
        for slot, llrs in served:
            expected_ber = float((1.0 / (1.0 + np.exp(np.abs(llrs)))).mean())
            by_context.setdefault(self.metrics.context_label(slot.context), []).append(
                (expected_ber, pilot_sinr_db(slot.grid, slot.pilots)))
        for label, estimates in by_context.items():
            means = self.monitor.record_estimates(label, estimates)
            self.metrics.context_ber_estimate.labels(label).set(means.expected_ber)
            self.metrics.context_pilot_sinr.labels(label).set(means.pilot_sinr_db)
