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
                             filtered in frequency and time with the channel prior (a delay
                             profile's length) they make most likely
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

Slots are featurized per DMRS layout (``featurize_layout``, real arithmetic only): the server runs
that function exported to ONNX (``serving.backend.OnnxFeaturizer``), training and evaluation run it
in torch. Sionna's DMRS have ``|P|^2 = 2`` (CDM power boost). The noise variance comes with the slot
(the simulator's, or the sender's estimate); where it is unknown (0), the featurizer estimates it
from the pilots (``classical.pilot_noise_variance``).
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch

from schema.dataset import SlotBatch
from schema.scenario import MAX_BITS_PER_SYMBOL
from service.receiver.classical import (
    Pair,
    PilotLayout,
    ls_estimate_pairs,
    maxlog_llrs,
    mrc_equalize_pairs,
    pilot_noise_variance,
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


def _by_layout(on: torch.Tensor) -> dict[int, torch.Tensor]:
    """Row indices of each DMRS layout in the batch, from its pilot REs ``on`` [B, S, F] (the estimators
    are built per layout)."""
    symbols = on.any(-1)  # [B, S]
    if bool((symbols == symbols[:1]).all()):  # the usual batch: one layout, no sort (unique costs a tenth of featurize)
        return {0: torch.arange(len(symbols))}
    patterns, inverse = torch.unique(symbols, dim=0, return_inverse=True)
    return {p: torch.nonzero(inverse == p).flatten() for p in range(len(patterns))}


def featurize(y: torch.Tensor, pilots: torch.Tensor, noise_variance: torch.Tensor,
              bits_per_symbol: torch.Tensor, run_layout: Callable[..., torch.Tensor] | None = None) -> torch.Tensor:
    """``y`` [B, A, S, F] complex, ``pilots`` [B, S, F] complex, ``noise_variance`` [B] (0: unknown),
    ``bits_per_symbol`` [B] -> features [B, 8A+21, F, S] float32. Raises ``PilotLayoutError`` for
    pilots off a DMRS layout. ``run_layout`` (``featurize_layout``'s signature) featurizes each
    layout's slots: ``featurize_layout`` itself by default, its ONNX export in the server."""
    run_layout = run_layout or featurize_layout
    on = pilots != 0  # [B, S, F]: pilot REs
    y, pilots = torch.view_as_real(y), torch.view_as_real(pilots)
    noise_variance = torch.as_tensor(noise_variance, dtype=torch.float32)
    orders = tuple(sorted(set(bits_per_symbol.tolist())))
    groups = list(_by_layout(on).values())
    if len(groups) == 1:  # the usual batch: no gathering
        return run_layout(y, pilots, noise_variance, bits_per_symbol, PilotLayout.of(on), orders)
    out = torch.empty(len(y), num_feature_channels(y.shape[1]), y.shape[3], y.shape[2])
    for rows in groups:
        out[rows] = run_layout(y[rows], pilots[rows], noise_variance[rows], bits_per_symbol[rows],
                               PilotLayout.of(on[rows]), orders)
    return out


def featurize_layout(y: torch.Tensor, pilots: torch.Tensor, noise_variance: torch.Tensor,
                     bits_per_symbol: torch.Tensor, layout: PilotLayout,
                     orders: tuple[int, ...], estimate_unknown_noise: bool | None = None) -> torch.Tensor:
    """The features of slots that share ``layout``: ``y`` [B, A, S, F, 2] and ``pilots`` [B, S, F, 2]
    as real and imaginary parts, ``noise_variance`` [B] (0: unknown), ``bits_per_symbol`` [B] of
    ``orders`` -> [B, 8A+21, F, S]. Real arithmetic only, so it exports to ONNX as it runs here;
    ``estimate_unknown_noise`` None: only if some slot needs it (an exported graph always does)."""
    y, pilots = Pair(y[..., 0], y[..., 1]), Pair(pilots[..., 0], pilots[..., 1])
    rms = y.power().mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    y = y.scale(1 / rms)
    no = noise_variance / rms.flatten().square()
    unknown = ~(no > 0)  # 0 or NaN (a stored slot sent without one)
    if estimate_unknown_noise is None:
        estimate_unknown_noise = bool(unknown.any())
    p = pilots.map(lambda t: t[:, None])
    pilot_power = p.power()
    on = pilot_power > 0
    raw_ls = y.times(p.conj()).map(lambda t: torch.where(on, t / pilot_power.clamp_min(1e-12), 0))
    if estimate_unknown_noise:
        no = torch.where(unknown, pilot_noise_variance(raw_ls, pilots), no)
    h_ls, err_ls = ls_estimate_pairs(y, pilots, no, layout.ls_estimator)
    h_rb, err_rb = robust_lmmse_channel_estimate(raw_ls, pilots, no, layout.robust_prior)
    # both estimates equalised and demapped in one pass each (at batch 1 the per-op overhead is the cost)
    twice = lambda t: torch.cat([t, t])  # noqa: E731
    h = Pair(torch.cat([h_ls.re, h_rb.re]), torch.cat([h_ls.im, h_rb.im]))
    x, no_eff = mrc_equalize_pairs(y.map(twice), h, torch.cat([err_ls, err_rb]), twice(no))
    llrs = maxlog_llrs(x, no_eff, twice(bits_per_symbol), orders).clamp(-LLR_CLIP, LLR_CLIP)
    # [2, B, ...]: the LS estimate's half, then the robust one's (a reshape, not a slice by the batch
    # size, so that the exported graph keeps the batch dynamic)
    x = torch.stack([x.re, x.im], 1).clamp(-4, 4).unflatten(0, (2, -1))  # [2, B, 2, S, F]: Re, Im
    no_eff = _log10(no_eff)[:, None].unflatten(0, (2, -1))
    llrs = llrs.unflatten(0, (2, -1))
    log_no = _log10(no)[:, None, None, None].expand(-1, 1, *y.re.shape[2:])
    channels = torch.cat([
        y.re, y.im, p.re, p.im, raw_ls.re, raw_ls.im,
        h_ls.re, h_ls.im, x[0], no_eff[0], log_no, llrs[0],
        h_rb.re, h_rb.im, x[1], no_eff[1], llrs[1],
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
