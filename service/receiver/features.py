"""Featurizer: turns a received slot into the DeepRx input tensor and its labels.

Input channels, over (subcarrier F, symbol S), in this order:
``[Re Y (A), Im Y (A), Re P, Im P, Re H_ls (A), Im H_ls (A)]`` (``4A + 2`` channels), where
``Y`` is the received grid scaled to unit RMS per slot (so the receiver is gain-invariant),
``P`` the DMRS values (0 off pilots), and ``H_ls = Y * conj(P) / |P|^2`` the raw LS channel
estimate at pilot REs (0 elsewhere). Sionna's DMRS have ``|P|^2 = 2`` (CDM power boost).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from schema.dataset import SlotBatch
from schema.scenario import MAX_BITS_PER_SYMBOL


def num_input_channels(rx: int) -> int:
    return 4 * rx + 2


def featurize(y: torch.Tensor, pilots: torch.Tensor) -> torch.Tensor:
    """``y`` [B, A, S, F] complex, ``pilots`` [B, S, F] complex -> features [B, 4A+2, F, S] float32."""
    rms = y.abs().square().mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
    y = y / rms
    pilots = pilots[:, None]
    power = pilots.abs().square()
    raw_ls = torch.where(power > 0, y * pilots.conj() / power.clamp_min(1e-12), torch.zeros_like(y))
    channels = torch.cat([y.real, y.imag, pilots.real, pilots.imag, raw_ls.real, raw_ls.imag], dim=1)
    return channels.transpose(2, 3).float().contiguous()


def bit_mask(bits_per_symbol: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 6, 1, 1] bool: which of the 6 output bits the slot's modulation uses."""
    return (torch.arange(MAX_BITS_PER_SYMBOL, device=bits_per_symbol.device)[None, :]
            < bits_per_symbol[:, None])[..., None, None]


@dataclass
class SlotTensors:
    """Model inputs and labels for a batch of slots, in the model's [B, C, F, S] layout."""

    features: torch.Tensor  # [B, 4A+2, F, S] float32
    bits_per_symbol: torch.Tensor  # [B] long
    labels: torch.Tensor  # [B, 6, F, S] float32 coded bits (0 where invalid)
    valid: torch.Tensor  # [B, 6, F, S] bool: data RE and bit used by the modulation

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, index) -> "SlotTensors":
        return SlotTensors(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def to(self, device: torch.device | str) -> "SlotTensors":
        return SlotTensors(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def prepare(batch: SlotBatch) -> SlotTensors:
    """Featurize a batch and lay out its labels; the only place the dataset meets the model."""
    y = torch.from_numpy(np.ascontiguousarray(batch.y))
    pilots = torch.from_numpy(np.ascontiguousarray(batch.pilots))
    k = torch.from_numpy(batch.bits_per_symbol.astype(np.int64))
    labels = torch.from_numpy(batch.bits).permute(0, 3, 2, 1).float()  # [B, S, F, 6] -> [B, 6, F, S]
    data = torch.from_numpy(batch.data_mask).transpose(1, 2)[:, None]  # [B, 1, F, S]
    return SlotTensors(featurize(y, pilots), k, labels.contiguous(), (data & bit_mask(k)).contiguous())
