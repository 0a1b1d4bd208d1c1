"""Where in the slot a model's bit errors sit: errors per OFDM symbol and per subcarrier, beside
LS-LMMSE's (hard decisions of the max-log LLRs the featurizer computes from the LS estimate).

    .venv/bin/python benchmarks/error_positions.py --model models/small --data data/dmrs1-high.h5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schema.dataset import read_slots  # noqa: E402
from service.receiver.checkpoint import load_checkpoint  # noqa: E402
from service.receiver.features import llr_channels, prepare  # noqa: E402
from service.serving.backend import InferenceConfig, build_backend  # noqa: E402


def error_positions(model_dir: Path, data: Path, batch: int = 64) -> dict[str, np.ndarray]:
    """Bit errors summed over slots and bits: ``{receiver}_by_symbol`` [S], ``{receiver}_by_subcarrier`` [F]."""
    slots, _ = read_slots(data)
    model = load_checkpoint(model_dir).model.eval()
    backend = build_backend(model, InferenceConfig(), next(model.parameters()).device)
    tensors = prepare(slots)
    totals: dict[str, np.ndarray] = {}
    for start in range(0, len(slots), batch):
        features, k = tensors.features[start:start + batch], tensors.bits_per_symbol[start:start + batch]
        truth = tensors.labels[start:start + batch].numpy() > 0.5
        valid = tensors.valid[start:start + batch].numpy()
        llrs = {"deeprx": backend(features, k).numpy(), "ls_lmmse": features[:, llr_channels(model.config.rx)].numpy()}
        for name, values in llrs.items():
            errors = ((values > 0) != truth) & valid  # [B, bits, F, S]
            for axis_name, axes in (("by_symbol", (0, 1, 2)), ("by_subcarrier", (0, 1, 3))):
                key = f"{name}_{axis_name}"
                totals[key] = totals.get(key, 0) + errors.sum(axis=axes)
    totals["bits_by_symbol"] = tensors.valid.numpy().sum(axis=(0, 1, 2))
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "small")
    parser.add_argument("--data", type=Path, required=True, help="HDF5 slots (deeprx-client simulate)")
    args = parser.parse_args()
    totals = error_positions(args.model, args.data)
    print(f"{'symbol':>6} {'bits':>8} {'DeepRx':>7} {'LS-LMMSE':>8}")
    for symbol, bits in enumerate(totals["bits_by_symbol"]):
        print(f"{symbol:>6} {int(bits):>8} {int(totals['deeprx_by_symbol'][symbol]):>7} "
              f"{int(totals['ls_lmmse_by_symbol'][symbol]):>8}")
    print(f"{'all':>6} {int(totals['bits_by_symbol'].sum()):>8} {int(totals['deeprx_by_symbol'].sum()):>7} "
          f"{int(totals['ls_lmmse_by_symbol'].sum()):>8}")
    print("by subcarrier, DeepRx:  ", totals["deeprx_by_subcarrier"].astype(int).tolist())
    print("by subcarrier, LS-LMMSE:", totals["ls_lmmse_by_subcarrier"].astype(int).tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
