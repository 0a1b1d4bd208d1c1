"""Pilot-based, label-free channel quality: the DMRS residual SINR of a slot.

At DMRS REs the transmitted symbols are known, so the raw LS estimate ``H = Y conj(P) / |P|^2`` is
the channel plus noise. Neighbouring pilots (adjacent pilot subcarriers of one DMRS symbol, and the
same subcarrier in consecutive DMRS symbols) see nearly the same channel when it is smooth, so half
the mean ``|H_i - H_j|^2`` over those pairs estimates the impairment a pilot-aided receiver faces:
noise, plus the frequency selectivity (long delay spread) and time variation (Doppler, when the
slot has two or more DMRS symbols) that interpolating between pilots cannot follow. The ratio of
channel power to it, in dB, is the slot's pilot SINR: ~ the SNR on a smooth channel, lower where
the channel outruns the pilot spacing. It is referred to unit-power data symbols (the pilot
boost ``|P|^2`` is divided out), so on a smooth channel it reads as the slot's SNR. It needs no
labels and no model.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=64)
def _neighbour_pairs(shape: tuple[int, int], packed: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Indices into a slot's pilot REs (in grid order) of the neighbouring pilot pairs: adjacent pilot
    subcarriers of one DMRS symbol, and the same subcarrier in consecutive DMRS symbols. A layout's
    pairs are kept by its pilot REs as packed bits (a served slot's layout recurs)."""
    on = np.unpackbits(np.frombuffer(packed, np.uint8), count=shape[0] * shape[1]).reshape(shape).astype(bool)
    index = np.full(shape, -1)
    index[on] = np.arange(on.sum())
    first, second = [], []
    symbols = np.flatnonzero(on.any(axis=1))
    for symbol in symbols:
        carriers = np.flatnonzero(on[symbol])
        first.append(index[symbol, carriers[:-1]])
        second.append(index[symbol, carriers[1:]])
    for a, b in zip(symbols[:-1], symbols[1:]):
        shared = np.flatnonzero(on[a] & on[b])
        first.append(index[a, shared])
        second.append(index[b, shared])
    return np.concatenate(first), np.concatenate(second)


def pilot_sinr_db(grids: np.ndarray, pilots: np.ndarray) -> np.ndarray | float:
    """``grids`` complex [..., A, 14, F], ``pilots`` complex [..., 14, F] (0 off pilots; the slots of
    a batch share one pilot layout) -> SINR in dB, one per slot (a float for one unbatched slot).
    Computed in double precision: a slot reads the same alone or in a batch (to 1e-14 dB)."""
    batched = pilots.ndim == 3
    grids, pilots = (grids, pilots) if batched else (grids[None], pilots[None])
    on = pilots[0] != 0
    first, second = _neighbour_pairs(on.shape, np.packbits(on).tobytes())
    symbols = pilots[:, on].astype(np.complex128)  # [B, P]
    power = np.abs(symbols) ** 2
    ls = grids[:, :, on] * (np.conj(symbols) / power)[:, None, :]  # [B, A, P]: |H_ls|^2 = |h|^2 + noise
    impairment = 0.5 * np.mean(np.abs(ls[..., second] - ls[..., first]) ** 2, axis=(1, 2))
    signal = np.mean(np.abs(ls) ** 2, axis=(1, 2)) - impairment
    noise_per_data_symbol = impairment * power.mean(axis=1)
    sinr = 10 * np.log10(np.maximum(signal, 1e-12) / np.maximum(noise_per_data_symbol, 1e-12))
    return sinr if batched else float(sinr[0])
