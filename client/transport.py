"""Transport-block decoding of served LLRs: the label a real deployment has.

The rest of the receiver chain (here the client) LDPC-decodes the soft bits DeepRx served with
Sionna's transport-block decoder; when the CRC passes, re-encoding the decoded bits gives the
slot's coded bits exactly, a label obtained without any genie.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from sionna.phy.nr import TBDecoder, TBEncoder
from sionna.phy.nr.pusch_config import check_pusch_configs

from client.simulator import pusch_config

BITS_TO_MODULATION = {2: "qpsk", 4: "16qam", 6: "64qam"}


class TransportBlockCoder:
    """TB encoder/decoder pair of one slot configuration (as the simulator's transmitter builds it)."""

    def __init__(self, prb: int, scs_khz: int, dmrs_additional_position: int, bits_per_symbol: int,
                 bp_iterations: int = 20):
        params = check_pusch_configs([pusch_config(prb, scs_khz, dmrs_additional_position,
                                                   BITS_TO_MODULATION[bits_per_symbol])])
        self.encoder = TBEncoder(
            target_tb_size=params["tb_size"], num_coded_bits=params["num_coded_bits"],
            target_coderate=params["target_coderate"], num_bits_per_symbol=params["num_bits_per_symbol"],
            num_layers=params["num_layers"], n_rnti=params["n_rnti"], n_id=params["n_id"],
            channel_type="PUSCH", codeword_index=0, use_scrambler=True)
        self.decoder = TBDecoder(self.encoder, num_bp_iter=bp_iterations)

    @torch.no_grad()
    def decode(self, llrs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """llrs [B, data REs, bits per symbol] (log P(1)/P(0)) -> (crc_ok [B], re-encoded coded bits
        [B, data REs, bits per symbol], meaningful where the CRC passed)."""
        flat = torch.as_tensor(llrs.reshape(len(llrs), 1, -1), dtype=torch.float32)
        info, crc_ok = self.decoder(flat)
        coded = self.encoder(info).reshape(llrs.shape).numpy().astype(np.uint8)
        return crc_ok.reshape(-1).numpy().astype(bool), coded


@lru_cache(maxsize=None)
def coder_for(prb: int, scs_khz: int, dmrs_additional_position: int, bits_per_symbol: int) -> TransportBlockCoder:
    return TransportBlockCoder(prb, scs_khz, dmrs_additional_position, bits_per_symbol)
