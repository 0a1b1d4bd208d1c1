"""Featurizer: turns a received slot into the DeepRx input tensor and its labels.

Input channels, over (subcarrier F, symbol S), in this order (``A`` receive antennas):

====================  =====  =================================================================
channels              count  meaning
====================  =====  =================================================================
Re Y, Im Y            2A     the received grid scaled to unit RMS per slot (gain invariance)
Re P, Im P            2      the DMRS values (0 off pilots)
Re H_raw, Im H_raw    2A     raw LS ``Y conj(P) / |P|^2`` at pilot REs, 0 elsewhere
Re H_ls, Im H_ls      2A     Sionna's PUSCH LS estimate interpolated over the whole grid
Re x, Im x            2      one-stream LMMSE symbol estimate from ``H_ls`` (``classical.py``)
log10 no_eff          1      its effective noise variance
log10 no              1      the noise variance (scaled like ``Y``)
LLR_ls                6      max-log LLRs of that estimate (LS-LMMSE's soft bits), clipped to
                             +-``LLR_CLIP``, 0 for bits the modulation does not have
Re H_rb, Im H_rb      2A     the robust LMMSE channel estimate (``classical.py``): the pilots
                             filtered in frequency and time with the training mix's widest prior
Re x_rb, Im x_rb      2      the LMMSE symbol estimate from ``H_rb``
log10 no_eff_rb       1      its effective noise variance
LLR_rb                6      its max-log LLRs, clipped like ``LLR_ls``
====================  =====  =================================================================

A model reads a prefix of them: ``grid`` inputs (the published DeepRx, ``4A + 2`` channels),
``classical`` inputs (``6A + 6``), ``residual`` inputs (``6A + 12``: the model then corrects
LS-LMMSE's LLRs rather than starting from nothing), ``weighted`` inputs (``6A + 12``: the network
reads the classical ones and adds LS-LMMSE's LLRs to its output times a per-RE weight it computes) or
``robust`` inputs (all ``8A + 21``: a weighted model that also reads the robust estimate and weighs
its LLRs the same way).

Sionna's DMRS have ``|P|^2 = 2`` (CDM power boost). The noise variance comes with the slot (the
simulator's, or the sender's estimate); where it is unknown (0), the featurizer estimates it from the
pilots (``classical.pilot_noise_variance``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from schema.dataset import SlotBatch
from schema.scenario import MAX_BITS_PER_SYMBOL
from service.receiver.classical import (
    ls_channel_estimate,
    maxlog_llrs,
    mrc_equalize,
    pilot_noise_variance,
    power,
    robust_lmmse_channel_estimate,
)

INPUTS = ("grid", "classical", "residual", "weighted", "robust")
LLR_CLIP = 32.0
_LOG_FLOOR = 1e-6  # log10 features are clamped to [-6, 3]


def num_input_channels(rx: int, inputs: str = "grid") -> int:
    if inputs not in INPUTS:
        raise ValueError(f"unknown model inputs '{inputs}' (one of {', '.join(INPUTS)})")
    everything = num_feature_channels(rx)
    weighted = 6 * rx + 6 + MAX_BITS_PER_SYMBOL
    return {"grid": 4 * rx + 2, "classical": 6 * rx + 6, "residual": weighted, "weighted": weighted,
            "robust": everything}[inputs]


def num_feature_channels(rx: int) -> int:
    """Channels the featurizer produces (every model reads a prefix of them)."""
    return 8 * rx + 9 + 2 * MAX_BITS_PER_SYMBOL


def llr_channels(rx: int, estimate: str = "ls") -> slice:
    """Where the max-log LLRs of the ``ls`` (LS-LMMSE's soft bits) or ``robust`` estimate sit."""
    first = {"ls": 6 * rx + 6, "robust": 8 * rx + 15}[estimate]
    return slice(first, first + MAX_BITS_PER_SYMBOL)


def _log10(values: torch.Tensor) -> torch.Tensor:
    return values.clamp(_LOG_FLOOR, 1e3).log10()


def _by_layout(pilots: torch.Tensor) -> dict[int, torch.Tensor]:
    """Row indices of each DMRS layout in the batch (Sionna's estimator is built per layout)."""
    symbols = (pilots != 0).any(-1)  # [B, S]
    if bool((symbols == symbols[:1]).all()):  # the usual batch: one layout, no sort (unique costs a tenth of featurize)
        return {0: torch.arange(len(symbols))}
    patterns, inverse = torch.unique(symbols, dim=0, return_inverse=True)
    return {p: torch.nonzero(inverse == p).flatten() for p in range(len(patterns))}


def featurize(y: torch.Tensor, pilots: torch.Tensor, noise_variance: torch.Tensor,
              bits_per_symbol: torch.Tensor) -> torch.Tensor:
    """``y`` [B, A, S, F] complex, ``pilots`` [B, S, F] complex, ``noise_variance`` [B] (0: unknown),
    ``bits_per_symbol`` [B] -> features [B, 8A+21, F, S] float32. Raises ``PilotLayoutError`` for
    pilots off a DMRS layout."""
    rms = power(y).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    y = y / rms
    no = torch.as_tensor(noise_variance, dtype=torch.float32) / rms.flatten().square()
    unknown = ~(no > 0)  # 0 or NaN (a stored slot sent without one)
    if unknown.any():
        no = torch.where(unknown, pilot_noise_variance(y, pilots), no)
    p = pilots[:, None]
    pilot_power = power(p)
    raw_ls = torch.where(pilot_power > 0, y * p.conj() / pilot_power.clamp_min(1e-12), torch.zeros_like(y))
    layouts = list(_by_layout(pilots).values())

    def estimated(estimate, received: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An estimator's channel and error variance over the batch, one call per DMRS layout."""
        if len(layouts) == 1:
            return estimate(received, pilots, no)
        h, err_var = torch.zeros_like(y), torch.zeros(y.shape[0], 1, *y.shape[2:])
        for rows in layouts:
            h[rows], err_var[rows] = estimate(received[rows], pilots[rows], no[rows])
        return h, err_var

    h_ls, err_ls = estimated(ls_channel_estimate, y)
    h_rb, err_rb = estimated(robust_lmmse_channel_estimate, raw_ls)
    # both estimates equalised and demapped in one pass each (at batch 1 the per-op overhead is the cost)
    twice = lambda t: torch.cat([t, t])  # noqa: E731
    x, no_eff = mrc_equalize(twice(y), torch.cat([h_ls, h_rb]), torch.cat([err_ls, err_rb]), twice(no))
    llrs = maxlog_llrs(x, no_eff, twice(bits_per_symbol)).clamp(-LLR_CLIP, LLR_CLIP)
    x = torch.view_as_real(x).movedim(-1, 1).clamp(-4, 4)  # [2B, 2, S, F]: Re, Im
    no_eff = _log10(no_eff)[:, None]
    ls, rb = slice(0, y.shape[0]), slice(y.shape[0], None)
    log_no = _log10(no)[:, None, None, None].expand(-1, 1, *y.shape[2:])
    channels = torch.cat([
        y.real, y.imag, p.real, p.imag, raw_ls.real, raw_ls.imag,
        h_ls.real, h_ls.imag, x[ls], no_eff[ls], log_no, llrs[ls],
        h_rb.real, h_rb.imag, x[rb], no_eff[rb], llrs[rb],
    ], dim=1)
    return channels.transpose(2, 3).float().contiguous()


def bit_mask(bits_per_symbol: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 6, 1, 1] bool: which of the 6 output bits the slot's modulation uses."""
    return (torch.arange(MAX_BITS_PER_SYMBOL, device=bits_per_symbol.device)[None, :]
            < bits_per_symbol[:, None])[..., None, None]


@dataclass
class SlotTensors:
    """Model inputs and labels for a batch of slots, in the model's [B, C, F, S] layout."""

    features: torch.Tensor  # [B, 8A+21, F, S] float32
    bits_per_symbol: torch.Tensor  # [B] long
    labels: torch.Tensor  # [B, 6, F, S] float32 coded bits (0 where invalid)
    valid: torch.Tensor  # [B, 6, F, S] bool: data RE and bit used by the modulation

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index) -> "SlotTensors":
        return SlotTensors(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device | str) -> "SlotTensors":
        return SlotTensors(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def prepare(batch: SlotBatch, chunk: int = 2048) -> SlotTensors:
    """Featurize a batch and lay out its labels; the only place the dataset meets the model."""
    y = torch.from_numpy(np.ascontiguousarray(batch.y))
    pilots = torch.from_numpy(np.ascontiguousarray(batch.pilots))
    no = torch.from_numpy(10.0 ** (-batch.snr_db.astype(np.float32) / 10))
    k = torch.from_numpy(batch.bits_per_symbol.astype(np.int64))
    features = torch.empty(len(batch), num_feature_channels(y.shape[1]), y.shape[3], y.shape[2])
    for i in range(0, len(batch), chunk):  # filled in place: a concatenation would hold the set twice
        features[i:i + chunk] = featurize(y[i:i + chunk], pilots[i:i + chunk], no[i:i + chunk], k[i:i + chunk])
    labels = torch.from_numpy(batch.bits).permute(0, 3, 2, 1).float()  # [B, S, F, 6] -> [B, 6, F, S]
    data = torch.from_numpy(batch.data_mask).transpose(1, 2)[:, None]  # [B, 1, F, S]
    return SlotTensors(features, k, labels.contiguous(), (data & bit_mask(k)).contiguous())
