"""5G NR PUSCH link-level simulator built from Sionna PHY blocks.

Each slot: random coded bits -> PUSCH transmitter (LDPC, QAM, DMRS, resource grid)
-> 3GPP TDL/CDL channel in the frequency domain with AWGN -> received grid ``y``.
On the same slot two classical receivers give the baselines stored beside it:
LS channel estimation (linear interpolation) + LMMSE equalisation, and
perfect-CSI LMMSE ("genie").

Channel family, delay spread, UE speed, DMRS and modulation are drawn once per *group*
of slots (``group_size``, default 8) because Sionna builds its blocks per configuration;
SNR is drawn per slot. Every draw is recorded per slot in the dataset.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np
import sionna.phy
import torch
from sionna.phy.channel import ApplyOFDMChannel, GenerateOFDMChannel
from sionna.phy.channel.tr38901 import CDL, TDL, PanelArray
from sionna.phy.mapping import Demapper
from sionna.phy.mimo import StreamManagement
from sionna.phy.nr import PUSCHConfig, PUSCHLSChannelEstimator, PUSCHTransmitter
from sionna.phy.ofdm import LinearDetector

from schema.dataset import SlotBatch
from schema.scenario import MAX_BITS_PER_SYMBOL, MODULATIONS, Range, Scenario

# One MCS index per modulation in 38.214 table 1 (mid code rates); uncoded BER does not
# depend on the code rate, transport-block decoding does.
MCS_INDEX = {"qpsk": 5, "16qam": 13, "64qam": 20}


@dataclass(frozen=True)
class GroupDraw:
    """The per-group scenario draw that fixes which Sionna blocks are used."""

    channel: str
    delay_spread_ns: float
    speed_mps: float
    dmrs_additional_position: int
    modulation: str


def pusch_config(prb: int, scs_khz: int, dmrs_additional_position: int, modulation: str) -> PUSCHConfig:
    """The PUSCH configuration every simulated slot uses (one layer, one port, DMRS type 1)."""
    config = PUSCHConfig()
    config.carrier.n_size_grid = prb
    config.carrier.subcarrier_spacing = scs_khz
    config.dmrs.additional_position = dmrs_additional_position
    config.tb.mcs_index = MCS_INDEX[modulation]
    return config


class _Link:
    """Transmitter and the two baseline receivers for one (DMRS, modulation) setting."""

    def __init__(self, scenario: Scenario, dmrs_additional_position: int, modulation: str):
        config = pusch_config(scenario.prb, scenario.scs_khz, dmrs_additional_position, modulation)
        self.bits_per_symbol = MODULATIONS[modulation]
        self.transmitter = PUSCHTransmitter(config, output_domain="freq")
        grid = self.transmitter.resource_grid
        self.resource_grid = grid
        self.ls_estimator = PUSCHLSChannelEstimator(
            grid,
            config.dmrs.length,
            config.dmrs.additional_position,
            config.dmrs.num_cdm_groups_without_data,
            interpolation_type="lin",
        )
        self.detector = LinearDetector(
            "lmmse", "bit", "maxlog", grid, StreamManagement(np.ones([1, 1], int), 1),
            constellation_type="qam", num_bits_per_symbol=self.bits_per_symbol, hard_out=True,
        )
        self.hard_demapper = Demapper("maxlog", "qam", self.bits_per_symbol, hard_out=True)
        mask = grid.pilot_pattern.mask[0, 0].cpu().numpy().astype(bool)  # [S, F], True = DMRS / CDM
        self.data_mask = ~mask


def _bs_array(rx: int, carrier_hz: float) -> PanelArray:
    """Base-station receive array with ``rx`` ports: 1 = V, 2 = cross-pol, 4 = two cross-pol columns."""
    return PanelArray(
        num_rows_per_panel=1,
        num_cols_per_panel=2 if rx == 4 else 1,
        polarization="single" if rx == 1 else "dual",
        polarization_type="V" if rx == 1 else "cross",
        antenna_pattern="38.901",
        carrier_frequency=carrier_hz,
    )


class SlotSimulator:
    """Generates :class:`SlotBatch` es for a scenario; the same seed gives the same slots."""

    def __init__(self, scenario: Scenario, seed: int = 0, group_size: int = 8):
        self.scenario = scenario
        self.group_size = group_size
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        # on the CPU everywhere: the same seed gives the same slots on a GPU machine (and the arrays go to numpy)
        sionna.phy.config.device = "cpu"
        sionna.phy.config.seed = seed
        self._apply_channel = ApplyOFDMChannel()
        self._link = lru_cache(maxsize=None)(lambda dmrs, mod: _Link(scenario, dmrs, mod))

    def _uniform(self, r: Range, size=None):
        return self._rng.uniform(r.low, r.high, size) if not r.fixed else np.full(size or (), r.low)

    def _draw_group(self) -> GroupDraw:
        s = self.scenario
        dmrs = s.dmrs_additional_positions
        return GroupDraw(
            channel=str(self._rng.choice(s.channels)),
            delay_spread_ns=float(self._uniform(s.delay_spread_ns)),
            speed_mps=float(self._uniform(s.speed_mps)),
            dmrs_additional_position=int(self._rng.integers(int(dmrs.low), int(dmrs.high) + 1)),
            modulation=str(self._rng.choice(s.modulations)),
        )

    def _channel_model(self, draw: GroupDraw):
        kind, letter = draw.channel.split("-")
        carrier_hz = self.scenario.carrier_ghz * 1e9
        common = dict(delay_spread=draw.delay_spread_ns * 1e-9, carrier_frequency=carrier_hz,
                      min_speed=draw.speed_mps, max_speed=draw.speed_mps)
        if kind == "TDL":
            return TDL(letter, num_rx_ant=self.scenario.rx, num_tx_ant=1, **common)
        ut_array = PanelArray(num_rows_per_panel=1, num_cols_per_panel=1, polarization="single",
                              polarization_type="V", antenna_pattern="omni", carrier_frequency=carrier_hz)
        return CDL(letter, ut_array=ut_array, bs_array=_bs_array(self.scenario.rx, carrier_hz),
                   direction="uplink", **common)

    @torch.no_grad()
    def simulate_group(self, num_slots: int) -> SlotBatch:
        """Simulate ``num_slots`` slots sharing one group draw."""
        draw = self._draw_group()
        link = self._link(draw.dmrs_additional_position, draw.modulation)
        snr_db = self._uniform(self.scenario.snr_db, num_slots).astype(np.float32)
        no = torch.as_tensor(10.0 ** (-snr_db / 10.0), dtype=torch.float32)

        x, _ = link.transmitter(num_slots)  # [B, 1 tx, 1 ant, S, F]
        h = GenerateOFDMChannel(self._channel_model(draw), link.resource_grid, normalize_channel=True)(num_slots)
        y = self._apply_channel(x, h, no[:, None, None, None, None])  # [B, 1 rx, A, S, F]

        data = torch.as_tensor(link.data_mask)
        coded = link.hard_demapper(x[:, 0, 0][:, data], no[:, None] * 0 + 1e-6)  # [B, n_data * k]
        h_ls, err_ls = link.ls_estimator(y, no[:, None, None])
        ls_bits = link.detector(y, h_ls, err_ls, no[:, None, None])[:, 0, 0]
        genie_bits = link.detector(y, h, torch.zeros(()), no[:, None, None])[:, 0, 0]

        k = link.bits_per_symbol
        n_data = int(link.data_mask.sum())
        bits = np.zeros((num_slots, *link.data_mask.shape, MAX_BITS_PER_SYMBOL), np.uint8)
        bits[:, link.data_mask, :k] = coded.reshape(num_slots, n_data, k).numpy().astype(np.uint8)
        x_grid = x[:, 0, 0].numpy()
        pilots = np.where(link.data_mask, 0, x_grid).astype(np.complex64)
        full = lambda value, dtype: np.full(num_slots, value, dtype)  # noqa: E731
        return SlotBatch(
            y=y[:, 0].numpy().astype(np.complex64),
            pilots=pilots,
            data_mask=np.broadcast_to(link.data_mask, (num_slots, *link.data_mask.shape)).copy(),
            bits=bits,
            bits_per_symbol=full(k, np.uint8),
            snr_db=snr_db,
            channel=np.asarray([draw.channel] * num_slots),
            delay_spread_ns=full(draw.delay_spread_ns, np.float32),
            speed_mps=full(draw.speed_mps, np.float32),
            dmrs_additional_position=full(draw.dmrs_additional_position, np.uint8),
            ls_lmmse_errors=(ls_bits != coded).sum(-1).numpy().astype(np.int32),
            genie_errors=(genie_bits != coded).sum(-1).numpy().astype(np.int32),
            num_bits=full(n_data * k, np.int32),
        )

    def batches(self, num_slots: int) -> Iterator[SlotBatch]:
        """Yield groups until ``num_slots`` slots have been produced."""
        done = 0
        while done < num_slots:
            n = min(self.group_size, num_slots - done)
            yield self.simulate_group(n)
            done += n
