"""Feedback monitor: remembers what was served and turns feedback into per-context BER windows.

The server records each served slot's hard decisions (bounded LRU); feedback for a slot id is
compared against them, so the BER is that of the model version that actually served the slot.
"""
from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ServedSlot:
    context: str
    model_version: str
    hard_bits: np.ndarray  # uint8 [data REs, bits per symbol]


@dataclass(frozen=True)
class BerWindow:
    errors: int
    bits: int
    slots: int

    @property
    def ber(self) -> float:
        return self.errors / self.bits if self.bits else 0.0


class FeedbackMonitor:
    def __init__(self, served_memory: int = 100_000, window_slots: int = 200):
        self._served: OrderedDict[str, ServedSlot] = OrderedDict()
        self._served_memory = served_memory
        self._window_slots = window_slots
        self._windows: dict[str, deque[tuple[int, int]]] = {}
        self._lock = threading.Lock()

    def served(self, slot_id: str, slot: ServedSlot) -> None:
        with self._lock:
            self._served[slot_id] = slot
            self._served.move_to_end(slot_id)
            while len(self._served) > self._served_memory:
                self._served.popitem(last=False)

    def lookup(self, slot_id: str) -> ServedSlot | None:
        with self._lock:
            return self._served.get(slot_id)

    def record(self, context: str, errors: int, bits: int) -> BerWindow:
        """Add one labelled slot to ``context``'s window and return the window's totals."""
        with self._lock:
            window = self._windows.setdefault(context, deque(maxlen=self._window_slots))
            window.append((errors, bits))
            return BerWindow(sum(e for e, _ in window), sum(b for _, b in window), len(window))

    def window(self, context: str) -> BerWindow:
        with self._lock:
            window = self._windows.get(context, ())
            return BerWindow(sum(e for e, _ in window), sum(b for _, b in window), len(window))
