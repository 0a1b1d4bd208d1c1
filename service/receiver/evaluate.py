"""Uncoded BER of DeepRx beside the LS-LMMSE and genie baselines stored with each slot, overall, per
SNR bin, and per condition cell (any per-slot scenario draw: channel, DMRS, speed, delay spread,
modulation)."""
from __future__ import annotations

import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from schema.dataset import SlotBatch
from service.receiver.features import prepare
from service.receiver.loss import bit_errors
from service.receiver.model import DeepRx

RECEIVERS = ("deeprx", "ls_lmmse", "genie")
# Bin edges of the numeric cell keys: the standard grid's low/high bins inside the training ranges,
# then the drift conditions' ranges.
SPEED_EDGES_MPS = (0, 15, 30, 60, 90, 150, np.inf)
DELAY_SPREAD_EDGES_NS = (0, 165, 300, 700, 1200, np.inf)
CELL_KEYS = ("channel", "dmrs", "speed", "delay_spread", "mod")
_MODULATION_NAMES = {2: "qpsk", 4: "16qam", 6: "64qam"}


def _binned(name: str, values: np.ndarray, edges: tuple, unit: str) -> np.ndarray:
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    fmt = lambda v: "inf" if np.isinf(v) else f"{v:g}"  # noqa: E731
    return np.asarray([f"{name}={fmt(edges[i])}-{fmt(edges[i + 1])}{unit}" for i in index])


def cell_labels(slots: SlotBatch, keys: list[str]) -> np.ndarray:
    """One label per slot naming its cell, e.g. ``TDL-C dmrs=1 speed=15-30m/s``."""
    unknown = [k for k in keys if k not in CELL_KEYS]
    if unknown:
        raise ValueError(f"unknown cell key(s) {unknown} (one of {', '.join(CELL_KEYS)})")
    parts = {
        "channel": lambda: slots.channel.astype(str),
        "dmrs": lambda: np.asarray([f"dmrs={d}" for d in slots.dmrs_additional_position]),
        "speed": lambda: _binned("speed", slots.speed_mps, SPEED_EDGES_MPS, "m/s"),
        "delay_spread": lambda: _binned("ds", slots.delay_spread_ns, DELAY_SPREAD_EDGES_NS, "ns"),
        "mod": lambda: np.asarray([_MODULATION_NAMES[int(k)] for k in slots.bits_per_symbol]),
    }
    columns = [parts[k]() for k in keys]
    return np.asarray([" ".join(row) for row in zip(*columns)]) if keys else np.full(len(slots), "all")


Forward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (features, bits per symbol) -> logits


@torch.no_grad()
def deeprx_bit_errors(model: DeepRx, slots: SlotBatch, batch_size: int = 256,
                      forward: Forward | None = None) -> np.ndarray:
    """Hard-decision bit errors of ``model`` (eval mode) per slot, run by ``forward`` when given (an
    inference backend of the same model), else by the module itself."""
    model.eval()
    forward = forward or model
    errors = []
    for start in range(0, len(slots), batch_size):
        part = prepare(slots.select(slice(start, start + batch_size)))
        logits = forward(part.features, part.bits_per_symbol)
        errors.append(bit_errors(logits, part.labels, part.valid).numpy())
    return np.concatenate(errors).astype(np.int64)


@dataclass
class BerReport:
    """Per-slot error counts of the three receivers, summarised overall and per SNR bin."""

    errors: dict[str, np.ndarray]
    num_bits: np.ndarray
    snr_db: np.ndarray
    bin_width_db: float = 5.0
    cells: np.ndarray = field(default_factory=lambda: np.empty(0, str))  # per-slot cell label (or none)

    def ber(self, mask: np.ndarray | None = None) -> dict[str, float]:
        mask = np.ones(len(self.num_bits), bool) if mask is None else mask
        total = max(1, int(self.num_bits[mask].sum()))
        return {name: int(errs[mask].sum()) / total for name, errs in self.errors.items()}

    def bit_errors(self, mask: np.ndarray) -> dict[str, int]:
        return {f"{name}_errors": int(errs[mask].sum()) for name, errs in self.errors.items()}

    def per_snr(self, within: np.ndarray | None = None) -> list[dict]:
        within = np.ones(len(self.num_bits), bool) if within is None else within
        bins = np.floor(self.snr_db / self.bin_width_db) * self.bin_width_db
        rows = []
        for low in np.unique(bins[within]):
            mask = within & (bins == low)
            rows.append({"snr_low": float(low), "snr_high": float(low + self.bin_width_db),
                         "slots": int(mask.sum()), "bits": int(self.num_bits[mask].sum()), **self.ber(mask),
                         **self.bit_errors(mask)})
        return rows

    def per_cell(self) -> list[dict]:
        """One row per (cell, SNR bin), cells in name order."""
        return [{"cell": str(cell), **row} for cell in np.unique(self.cells)
                for row in self.per_snr(self.cells == cell)]

    def to_dict(self) -> dict:
        result = {"slots": int(len(self.num_bits)), "ber": self.ber(), "per_snr": self.per_snr()}
        if len(self.cells):
            result["per_cell"] = self.per_cell()
            result["comparison"] = self.comparison()
        return result

    def comparison(self, min_slots: int = 100, high_snr_db: float = 15.0) -> dict:
        """How DeepRx stands against LS-LMMSE over the cells: the (cell, SNR bin) pairs where it is
        worse (cells of at least ``min_slots``), each marked ``beyond_noise`` when the two error counts
        differ by more than twice the standard deviation of their difference (``2 sqrt(a + b)``), the
        pairs where perfect CSI (genie) is worse than LS-LMMSE, which is how many such pairs noise
        alone makes in bins of a few errors, and the pooled BER ratio at or above ``high_snr_db``."""
        big = {c for c in np.unique(self.cells) if (self.cells == c).sum() >= min_slots}
        rows = [r for r in self.per_cell() if r["cell"] in big]
        worse = [{"cell": r["cell"], "snr_low": r["snr_low"], "deeprx_errors": r["deeprx_errors"],
                  "ls_lmmse_errors": r["ls_lmmse_errors"],
                  "beyond_noise": _beyond_noise(r["deeprx_errors"], r["ls_lmmse_errors"])}
                 for r in rows if r["deeprx"] > r["ls_lmmse"]]
        high = self.snr_db >= high_snr_db
        pooled = self.ber(high)
        return {"cells": len(big), "cell_snr_bins": len(rows),
                "worse_than_ls_lmmse": worse, "worse_beyond_noise": sum(w["beyond_noise"] for w in worse),
                "genie_worse_than_ls_lmmse": sum(r["genie"] > r["ls_lmmse"] for r in rows),
                "high_snr_db": high_snr_db, "high_snr_ber": pooled, "high_snr_errors": self.bit_errors(high),
                "high_snr_ratio_to_ls_lmmse": pooled["deeprx"] / max(pooled["ls_lmmse"], 1e-12)}

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

    def cell_table(self) -> str:
        """Per cell and SNR bin: BER of each receiver, DeepRx / LS-LMMSE, and the error counts behind them."""
        width = max(len(c) for c in self.cells)
        header = (f"{'cell':<{width}} {'SNR':>7} {'slots':>5} " + " ".join(f"{r:>9}" for r in RECEIVERS)
                  + f" {'DRx/LS':>7} {'errors DRx/LS/genie':>20}")
        lines = [header, "-" * len(header)]
        for row in self.per_cell():
            ratio = row["deeprx"] / row["ls_lmmse"] if row["ls_lmmse"] else float("nan")
            counts = "/".join(str(row[f"{r}_errors"]) for r in RECEIVERS)
            lines.append(f"{row['cell']:<{width}} {row['snr_low']:>3g}..{row['snr_high']:<3g} {row['slots']:>5} "
                         + " ".join(f"{row[r]:>9.2e}" for r in RECEIVERS) + f" {ratio:>7.2f} {counts:>20}")
        c = self.comparison()
        lines.append("-" * len(header))
        lines.append(f"cells with >= 100 slots: {c['cells']}; (cell, SNR bin) pairs where DeepRx is worse than "
                     f"LS-LMMSE: {len(c['worse_than_ls_lmmse'])} of {c['cell_snr_bins']} "
                     f"({c['worse_beyond_noise']} beyond two standard deviations of the error counts; "
                     f"perfect CSI is worse in {c['genie_worse_than_ls_lmmse']})")
        e = c["high_snr_errors"]
        lines.append(f"pooled at >= {c['high_snr_db']:g} dB: DeepRx {c['high_snr_ber']['deeprx']:.2e} "
                     f"({e['deeprx_errors']} errors), LS-LMMSE {c['high_snr_ber']['ls_lmmse']:.2e} "
                     f"({e['ls_lmmse_errors']}), genie {c['high_snr_ber']['genie']:.2e} ({e['genie_errors']}); "
                     f"DeepRx / LS-LMMSE = {c['high_snr_ratio_to_ls_lmmse']:.3f}")
        return "\n".join(lines)

    def heatmap(self, path: str, title: str = "") -> None:
        """DeepRx / LS-LMMSE BER ratio over cells (rows) and SNR bins (columns), log colour scale."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm

        rows = self.per_cell()
        cells = list(dict.fromkeys(r["cell"] for r in rows))
        bins = sorted({r["snr_low"] for r in rows})
        ratio = np.full((len(cells), len(bins)), np.nan)
        for r in rows:
            if r["ls_lmmse_errors"] or r["deeprx_errors"]:
                ratio[cells.index(r["cell"]), bins.index(r["snr_low"])] = (
                    max(r["deeprx_errors"], 0.5) / max(r["ls_lmmse_errors"], 0.5))
        fig, ax = plt.subplots(figsize=(1.2 * len(bins) + 3, 0.28 * len(cells) + 1.5))
        image = ax.imshow(ratio, cmap="RdBu_r", norm=LogNorm(vmin=1 / 8, vmax=8), aspect="auto")
        for (i, j), value in np.ndenumerate(ratio):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(bins)), [f"{b:g}..{b + self.bin_width_db:g}" for b in bins], fontsize=7)
        ax.set_yticks(range(len(cells)), cells, fontsize=6)
        ax.set_xlabel("SNR [dB]")
        ticks = [1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8]
        bar = fig.colorbar(image, ax=ax, ticks=ticks, label="DeepRx / LS-LMMSE errors")
        bar.ax.set_yticklabels([f"{t:g}" for t in ticks])
        bar.ax.minorticks_off()
        title = f"{title or 'DeepRx vs LS-LMMSE per condition'} (blue: DeepRx makes fewer errors)"
        ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

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


def _beyond_noise(errors: int, reference: int) -> bool:
    """``errors`` exceeds ``reference`` by more than two standard deviations of the difference of two
    independent Poisson counts."""
    return bool(errors - reference > 2 * np.sqrt(errors + reference))


def evaluate(model: DeepRx, slots: SlotBatch, bin_width_db: float = 5.0, by: list[str] | None = None,
             forward: Forward | None = None) -> BerReport:
    """BER report of ``model`` on ``slots``; ``by`` names the cell keys (``CELL_KEYS``) to group by;
    ``forward`` runs the model (an inference backend of it; default: the module)."""
    return BerReport(
        errors={"deeprx": deeprx_bit_errors(model, slots, forward=forward),
                "ls_lmmse": slots.ls_lmmse_errors.astype(np.int64),
                "genie": slots.genie_errors.astype(np.int64)},
        num_bits=slots.num_bits.astype(np.int64), snr_db=slots.snr_db, bin_width_db=bin_width_db,
        cells=cell_labels(slots, by) if by else np.empty(0, str),
    )
