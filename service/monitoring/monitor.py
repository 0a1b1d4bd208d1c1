"""Feedback monitor: remembers what was served and turns feedback into per-context BER windows.

Contexts without labels still get two label-free estimates per served slot: the expected BER under
the model's own LLRs, ``mean sigma(-|LLR|)`` (as good as the model's calibration; the BCE loss
trains for calibration), and the pilot-based DMRS residual SINR (``service/monitoring/pilots.py``), which
needs no model and shows channels that outrun the pilot spacing.

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
    genie_errors: int = 0  # reference errors reported by the client, over ``genie_bits`` bits
    genie_bits: int = 0

    @property
    def ber(self) -> float:
        return self.errors / self.bits if self.bits else 0.0

    @property
    def genie_ber(self) -> float | None:
        return self.genie_errors / self.genie_bits if self.genie_bits else None


@dataclass(frozen=True)
class TargetRule:
    """A context is a target when, over at least ``min_slots`` labelled slots, its BER exceeds
    ``absolute_ber``, or ``relative_to_genie`` times the genie BER the client reported."""

    absolute_ber: float = 0.05
    relative_to_genie: float | None = 1.5
    min_slots: int = 50

    def is_target(self, window: BerWindow) -> bool:
        if window.slots < self.min_slots:
            return False
        if window.ber > self.absolute_ber:
            return True
        genie = window.genie_ber
        return self.relative_to_genie is not None and genie is not None and window.ber > self.relative_to_genie * genie


@dataclass(frozen=True)
class LabelFree:
    """Window means of a context's label-free estimates."""

    expected_ber: float
    pilot_sinr_db: float


class FeedbackMonitor:
    def __init__(self, served_memory: int = 100_000, window_slots: int = 200):
        self._served: OrderedDict[str, ServedSlot] = OrderedDict()
        self._served_memory = served_memory
        self._window_slots = window_slots
        self._windows: dict[str, deque[tuple[int, int, int | None]]] = {}
        self._estimates: dict[str, deque[tuple[float, float]]] = {}
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

    def record(self, context: str, errors: int, bits: int, genie_errors: int | None = None) -> BerWindow:
        """Add one labelled slot to ``context``'s window and return the window's totals."""
        with self._lock:
            window = self._windows.setdefault(context, deque(maxlen=self._window_slots))
            window.append((errors, bits, genie_errors))
            return self._totals(window)

    @staticmethod
    def _totals(window) -> BerWindow:
        reported = [(g, b) for _, b, g in window if g is not None]
        return BerWindow(sum(e for e, _, _ in window), sum(b for _, b, _ in window), len(window),
                         sum(g for g, _ in reported), sum(b for _, b in reported))

    def window(self, context: str) -> BerWindow:
        with self._lock:
            return self._totals(self._windows.get(context, ()))

    def record_estimates(self, context: str, estimates: list[tuple[float, float]]) -> LabelFree:
        """Add served slots' label-free estimates (expected BER, pilot SINR dB); returns the context's
        window means."""
        with self._lock:
            window = self._estimates.setdefault(context, deque(maxlen=self._window_slots))
            window.extend(estimates)
            return self._means(window)

    @staticmethod
    def _means(window) -> LabelFree:
        return LabelFree(sum(b for b, _ in window) / len(window), sum(s for _, s in window) / len(window))

    def estimate(self, context: str) -> LabelFree | None:
        with self._lock:
            window = self._estimates.get(context)
            return self._means(window) if window else None

    def windows(self) -> dict[str, BerWindow]:
        """Every context's feedback window (empty for contexts only served, never labelled)."""
        with self._lock:
            return {context: self._totals(self._windows.get(context, ()))
                    for context in dict.fromkeys([*self._windows, *self._estimates])}

    def targets(self, rule: TargetRule) -> dict[str, BerWindow]:
        """Contexts that currently meet ``rule``, with their windows."""
        return {context: w for context, w in self.windows().items() if rule.is_target(w)}
