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

import numpy as np


def pilot_sinr_db(grid: np.ndarray, pilots: np.ndarray) -> float:
    """``grid`` complex [A, 14, F], ``pilots`` complex [14, F] (0 off pilots) -> SINR in dB."""
    power = np.abs(pilots) ** 2
    on = power > 0
    ls = np.where(on, grid * np.conj(pilots) / np.where(on, power, 1.0), 0)  # [A, S, F]
    differences = []
    symbols = np.flatnonzero(on.any(axis=1))
    for symbol in symbols:  # adjacent pilot subcarriers of one DMRS symbol
        carriers = np.flatnonzero(on[symbol])
        differences.append(ls[:, symbol, carriers[1:]] - ls[:, symbol, carriers[:-1]])
    for first, second in zip(symbols[:-1], symbols[1:]):  # the same subcarrier in consecutive DMRS symbols
        shared = np.flatnonzero(on[first] & on[second])
        differences.append(ls[:, second, shared] - ls[:, first, shared])
    impairment = 0.5 * np.mean(np.abs(np.concatenate([d.ravel() for d in differences])) ** 2)
    signal = np.mean(np.abs(ls[:, on]) ** 2) - impairment  # |H_ls|^2 = |h|^2 + noise
    noise_per_data_symbol = impairment * np.mean(power[on])
    return float(10 * np.log10(max(signal, 1e-12) / max(noise_per_data_symbol, 1e-12)))
