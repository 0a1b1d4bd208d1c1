"""A slot as the service receives it: validated arrays plus the request's metadata."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ReceivedSlot:
    slot_id: str
    context: str
    grid: np.ndarray  # complex64 [A, 14, F]
    pilots: np.ndarray  # complex64 [14, F]
    data_mask: np.ndarray  # bool [14, F]
    bits_per_symbol: int
    noise_variance: float
    dmrs_position: int  # the PUSCH DMRS additional position its pilots occupy (checked at decode)
    arrival: float = 0.0  # time.perf_counter() when the server decoded it
