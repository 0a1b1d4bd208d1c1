"""Uncoded BER of DeepRx beside the LS-LMMSE and genie baselines stored with each slot."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np
import torch

from schema.dataset import SlotBatch
from service.receiver.features import prepare
from service.receiver.loss import bit_errors
from service.receiver.model import DeepRx

RECEIVERS = ("deeprx", "ls_lmmse", "genie")


@torch.no_grad()
def deeprx_bit_errors(model: DeepRx, slots: SlotBatch, batch_size: int = 256) -> np.ndarray:
    """Hard-decision bit errors of ``model`` (eval mode) per slot."""
    model.eval()
    errors = []
    for start in range(0, len(slots), batch_size):
        part = prepare(slots.select(slice(start, start + batch_size)))
        logits = model(part.features, part.bits_per_symbol)
        errors.append(bit_errors(logits, part.labels, part.valid).numpy())
    return np.concatenate(errors).astype(np.int64)


@dataclass
class BerReport:
    """Per-slot error counts of the three receivers, summarised overall and per SNR bin."""

    errors: dict[str, np.ndarray]
    num_bits: np.ndarray
    snr_db: np.ndarray
    bin_width_db: float = 5.0

    def ber(self, mask: np.ndarray | None = None) -> dict[str, float]:
        mask = np.ones(len(self.num_bits), bool) if mask is None else mask
        total = max(1, int(self.num_bits[mask].sum()))
        return {name: int(errs[mask].sum()) / total for name, errs in self.errors.items()}

    def per_snr(self) -> list[dict]:
        bins = np.floor(self.snr_db / self.bin_width_db) * self.bin_width_db
        rows = []
        for low in np.unique(bins):
            mask = bins == low
            rows.append({"snr_low": float(low), "snr_high": float(low + self.bin_width_db),
                         "slots": int(mask.sum()), **self.ber(mask)})
        return rows

    def to_dict(self) -> dict:
        return {"slots": int(len(self.num_bits)), "ber": self.ber(), "per_snr": self.per_snr()}

    def table(self) -> str:
        header = f"{'SNR [dB]':>12} {'slots':>6} " + " ".join(f"{r:>10}" for r in RECEIVERS)
        lines = [header, "-" * len(header)]
        for row in self.per_snr():
            label = f"{row['snr_low']:g}..{row['snr_high']:g}"
            lines.append(f"{label:>12} {row['slots']:>6} " + " ".join(f"{row[r]:>10.5f}" for r in RECEIVERS))
        overall = self.ber()
        lines.append("-" * len(header))
        lines.append(f"{'all':>12} {len(self.num_bits):>6} " + " ".join(f"{overall[r]:>10.5f}" for r in RECEIVERS))
        return "\n".join(lines)

    def plot(self, path: str, title: str = "") -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.per_snr()
        centres = [(r["snr_low"] + r["snr_high"]) / 2 for r in rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, style in zip(RECEIVERS, ("o-", "s--", "^:")):
            ax.semilogy(centres, [max(r[name], 1e-6) for r in rows], style, label=name)
        ax.set_xlabel("SNR [dB] (bin centre)")
        ax.set_ylabel("uncoded BER")
        ax.set_title("\n".join(textwrap.wrap(title or "DeepRx vs classical receivers", 70)), fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


def evaluate(model: DeepRx, slots: SlotBatch, bin_width_db: float = 5.0) -> BerReport:
    return BerReport(
        errors={"deeprx": deeprx_bit_errors(model, slots),
                "ls_lmmse": slots.ls_lmmse_errors.astype(np.int64),
                "genie": slots.genie_errors.astype(np.int64)},
        num_bits=slots.num_bits.astype(np.int64), snr_db=slots.snr_db, bin_width_db=bin_width_db,
    )
