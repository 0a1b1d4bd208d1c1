"""The classical front end DeepRx builds on: Sionna's PUSCH LS channel estimate over the whole grid,
and the one-stream LMMSE equalizer's symbol estimates and effective noise.

The LS estimate is Sionna's ``PUSCHLSChannelEstimator`` (CDM-aware LS at the DMRS, linear
interpolation in frequency and time), the same block the simulator's LS-LMMSE baseline uses, so
DeepRx sees exactly the estimate that baseline works from. The estimator knows the DMRS values of
its own PUSCH configuration; a slot whose pilots differ (another scrambling identity, say) is first
de-rotated at its pilot REs by ``P_sionna / P_slot``, so the LS step divides by the slot's own
pilots.

For one transmitted stream Sionna's LMMSE equalizer (``sionna.phy.ofdm.LMMSEEqualizer``) reduces to
maximum-ratio combining with bias removal, ``x = sum_a conj(h_a) y_a / g`` with ``g = sum_a |h_a|^2``,
and effective noise ``(no + err_var) / g``. That closed form is evaluated here on whole grids
(a test checks it against Sionna's block), because the general block, with its per-RE matrix
inverses, costs several times the network's forward pass on a CPU.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from sionna.phy.nr import PUSCHConfig, PUSCHLSChannelEstimator
from sionna.phy.nr.pusch_pilot_pattern import PUSCHPilotPattern
from sionna.phy.ofdm import ResourceGrid

from schema.scenario import NUM_OFDM_SYMBOLS

MAX_DMRS_ADDITIONAL_POSITION = 3


class PilotLayoutError(ValueError):
    """The slot's pilots are not at the REs of a PUSCH DMRS layout (type 1, one port)."""


def _pusch_config(num_subcarriers: int, additional_position: int) -> PUSCHConfig:
    config = PUSCHConfig()
    config.carrier.n_size_grid = num_subcarriers // 12
    config.dmrs.additional_position = additional_position
    return config


@lru_cache(maxsize=None)
def _dmrs_layouts(num_subcarriers: int) -> dict[tuple[int, ...], int]:
    """DMRS symbol indices -> additional position, for this grid width."""
    return {tuple(_pusch_config(num_subcarriers, p).dmrs_symbol_indices): p
            for p in range(MAX_DMRS_ADDITIONAL_POSITION + 1)}


@lru_cache(maxsize=None)
def pusch_resource_grid(num_subcarriers: int, additional_position: int) -> ResourceGrid:
    """Sionna's resource grid of one PUSCH layout (one layer, DMRS type 1, default scrambling)."""
    config = _pusch_config(num_subcarriers, additional_position)
    return ResourceGrid(num_ofdm_symbols=NUM_OFDM_SYMBOLS, fft_size=num_subcarriers,
                        subcarrier_spacing=config.carrier.subcarrier_spacing * 1e3, num_tx=1, num_streams_per_tx=1,
                        cyclic_prefix_length=0, pilot_pattern=PUSCHPilotPattern([config], device="cpu"),
                        device="cpu")


@lru_cache(maxsize=None)
def _estimator(num_subcarriers: int, additional_position: int) -> tuple[PUSCHLSChannelEstimator, torch.Tensor]:
    """Sionna's LS estimator for one layout, and that layout's DMRS values as a [S, F] grid."""
    config = _pusch_config(num_subcarriers, additional_position)
    grid = pusch_resource_grid(num_subcarriers, additional_position)
    estimator = PUSCHLSChannelEstimator(grid, config.dmrs.length, additional_position,
                                        config.dmrs.num_cdm_groups_without_data, interpolation_type="lin",
                                        device="cpu")
    mask = grid.pilot_pattern.mask[0, 0].bool()  # [S, F]: DMRS REs, the empty CDM group included
    values = torch.zeros(mask.shape, dtype=torch.complex64)
    values[mask] = grid.pilot_pattern.pilots[0, 0].to(torch.complex64)  # row-major, as Sionna fills the mask
    return estimator, values


def check_pilot_layout(pilots: torch.Tensor) -> int:
    """``pilots`` [S, F] complex (0 off the DMRS) -> the PUSCH DMRS additional position whose REs they
    occupy; ``PilotLayoutError`` when they match none (the estimator would read noise as pilots)."""
    symbols = tuple(int(s) for s in torch.nonzero(pilots.abs().sum(-1) > 0).flatten())
    layouts = _dmrs_layouts(pilots.shape[-1])
    if symbols not in layouts:
        raise PilotLayoutError(f"pilots on OFDM symbols {list(symbols)}: not a PUSCH DMRS layout "
                               f"(one of {[list(s) for s in layouts]})")
    position = layouts[symbols]
    if not torch.equal(pilots != 0, _estimator(pilots.shape[-1], position)[1] != 0):
        raise PilotLayoutError("pilot REs differ from those of the PUSCH DMRS (type 1, one port) on "
                               f"symbols {list(symbols)}")
    return position


def ls_channel_estimate(y: torch.Tensor, pilots: torch.Tensor, no: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``y`` [B, A, S, F] complex, ``pilots`` [B, S, F] (one layout), ``no`` [B] ->
    ``h`` [B, A, S, F] complex and its error variance ``err_var`` [B, 1, S, F]."""
    estimator, reference = _estimator(pilots.shape[-1], check_pilot_layout(pilots[0]))
    on = pilots != 0
    if not torch.equal(on, (reference != 0).expand_as(on)):
        raise PilotLayoutError("slots of one batch must share one pilot layout")
    ratio = torch.where(on, reference / torch.where(on, pilots, torch.ones_like(pilots)), torch.ones_like(pilots))
    h, err_var = estimator((y * ratio[:, None])[:, None], no[:, None, None])
    return h[:, 0, :, 0, 0], err_var[:, 0, :1, 0, 0]


def mrc_equalize(y: torch.Tensor, h: torch.Tensor, err_var: torch.Tensor,
                 no: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One-stream LMMSE (unbiased): ``x`` [B, S, F] complex and effective noise ``no_eff`` [B, S, F]."""
    gain = h.abs().square().sum(1).clamp_min(1e-12)
    x = (h.conj() * y).sum(1) / gain
    no_eff = (no[:, None, None] + err_var[:, 0]) / gain
    return x, no_eff


def pilot_noise_variance(y: torch.Tensor, pilots: torch.Tensor) -> torch.Tensor:
    """Noise variance per slot [B] from the DMRS alone, for slots sent without one. On three
    neighbouring pilot subcarriers of a comb-2 DMRS, the second difference of the raw LS estimates
    ``H_k-2 - 2 H_k + H_k+2`` cancels a channel that varies linearly in frequency and leaves noise of
    variance ``6 no / |P|^2``."""
    p = pilots[:, None]
    on = p != 0
    ls = torch.where(on, y * p.conj() / torch.where(on, p.abs().square(), torch.ones_like(p.real)), 0)
    triples = (on[..., 4:] & on[..., 2:-2] & on[..., :-4]).expand(-1, y.shape[1], -1, -1)
    second = (ls[..., 4:] - 2 * ls[..., 2:-2] + ls[..., :-4]).abs().square() * triples
    per_slot = second.sum((1, 2, 3)) / triples.sum((1, 2, 3)).clamp_min(1)
    pilot_power = (pilots.abs().square() * (pilots != 0)).sum((1, 2)) / (pilots != 0).sum((1, 2)).clamp_min(1)
    return (per_slot * pilot_power / 6).clamp_min(1e-6)
