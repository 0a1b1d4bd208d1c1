"""Dropout-style masked pool gradients computed per layer vs dense per-sample gradients then masked.

For each keep fraction p: wall time and peak memory of ``ParameterSpace.masked_per_sample_gradients``
(only the kept coordinates, from one batched backward per chunk) against ``per_sample_gradients``
(vmap over grad, all P coordinates) followed by the same mask; that the two agree coordinate for
coordinate; and how well raw identity scores from the mask rank the pool against unmasked ones.
One process, masked runs first; peak memory is each call's resident-set growth (``common.py``).

    .venv/bin/python benchmarks/masked_gradients.py --pool data/pool-2000.h5 --targets data/eval-drift-highspeed.h5
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_workload_arguments, load_workload, measure  # noqa: E402
from service.influence.compress import Compressor  # noqa: E402
from service.influence.learned import spearman  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--fractions", default="0.01,0.05,0.2", help="mask keep fractions")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    work = load_workload(args)
    space, pool = work.space, work.pool
    target_gradient = space.mean_gradient(work.targets)
    out: dict = {"model": str(args.model), "parameters": space.size, "pool": len(pool), "masked": []}
    masked_runs = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        compressor = Compressor.parse(f"mask:{fraction}")
        kept = compressor.kept(space.size)
        gradients, seconds, memory = measure(space.masked_per_sample_gradients, pool, kept)
        masked_runs.append((fraction, kept, gradients))
        out["masked"].append({"fraction": fraction, "dim": len(kept), "seconds": seconds, "peak_bytes": memory})
        print(f"per-layer mask p={fraction}: {len(kept)} coordinates, {seconds:.1f} s, {memory / 2**20:.0f} MiB")
    dense, seconds, memory = measure(space.per_sample_gradients, pool)
    out["dense"] = {"seconds": seconds, "peak_bytes": memory}
    print(f"dense per-sample gradients: {space.size} coordinates, {seconds:.1f} s, {memory / 2**20:.0f} MiB")
    exact_scores = -(dense @ target_gradient)
    for row, (fraction, kept, gradients) in zip(out["masked"], masked_runs):
        row["max_abs_difference_vs_dense"] = float((gradients - dense[:, kept]).abs().max())
        row["speedup_vs_dense"] = out["dense"]["seconds"] / row["seconds"]
        row["spearman_raw_identity_vs_unmasked"] = spearman(-(gradients @ target_gradient[kept]), exact_scores)
        print(f"  p={fraction}: {row['speedup_vs_dense']:.1f}x faster, max |diff| {row['max_abs_difference_vs_dense']:.1e}, "
              f"Spearman vs unmasked {row['spearman_raw_identity_vs_unmasked']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
