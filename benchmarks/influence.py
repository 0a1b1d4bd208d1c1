"""Influence accuracy and cost on one model, pool and target, every method in one run.

- each curvature method's raw scores against the ``cg`` reference (Spearman), wall time, peak memory;
- compressed scores (mask / gauss / sjlt at several sizes) against uncompressed ones for the same H;
- the learned estimator trained on exact scores of ``--learned-fraction`` of the pool rows, held-out
  Spearman and the cost ratio of features vs per-sample gradients;
- which conditions the top-ranked pool slots come from, against the pool's base rates.

Peak memory is the resident-set growth during each method's call (``benchmarks/common.py``).

    .venv/bin/python benchmarks/influence.py --model models/small --pool data/pool.h5 --targets data/drift.h5
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_workload_arguments, load_workload, measure  # noqa: E402
from service.influence.compress import Compressor  # noqa: E402
from service.influence.curvature import CurvatureConfig, default_damping  # noqa: E402
from service.influence.inverse import fit_curvature  # noqa: E402
from service.influence.learned import EstimatorConfig, InfluenceEstimator, slot_features, spearman  # noqa: E402
from service.influence.scores import influence, normalised  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--methods", default="identity,diagonal,kfac,ekfac,arnoldi")
    parser.add_argument("--compress", default="mask:0.01,mask:0.05,gauss:1024,gauss:4096,sjlt:1024,sjlt:4096")
    parser.add_argument("--learned-fraction", type=float, default=0.05)
    parser.add_argument("--learned-targets", type=int, default=8, help="target groups for the learned estimator")
    parser.add_argument("--top", type=int, default=100, help="top slots used for the condition analysis")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    work = load_workload(args)
    model, space, pool_slots, target_attrs = work.model, work.space, work.pool_slots, work.target_attrs
    pool, targets, fit = work.pool, work.targets, work.fit
    out: dict = {"model": str(args.model), "parameters": space.size, "pool": len(pool), "targets": len(targets),
                 "target_scenario": target_attrs.get("scenario", ""), "fit_slots": len(fit)}

    gradients, seconds, memory = measure(space.per_sample_gradients, pool)
    target_gradient = space.mean_gradient(targets)
    out["pool_gradients"] = {"seconds": seconds, "peak_bytes": memory, "samples_per_second": len(pool) / seconds}
    print(f"per-sample gradients: {len(pool)} x {space.size} in {seconds:.1f} s ({len(pool) / seconds:.0f}/s)")

    damping = default_damping(space, fit, CurvatureConfig())  # one damping for every method
    out["damping"] = damping

    def scores_with(method: str, extra: dict | None = None):
        curvature = fit_curvature(space, fit, CurvatureConfig(method=method, damping=damping, **(extra or {})))
        return influence(target_gradient, gradients, curvature), normalised("l-relative", target_gradient,
                                                                            gradients, curvature)

    reference, seconds, memory = measure(
        lambda: influence(target_gradient, gradients, fit_curvature(
            space, fit, CurvatureConfig(method="cg", damping=damping, cg_iterations=args.cg_iterations,
                                        cg_tolerance=1e-6))))
    out["methods"] = {"cg": {"seconds": seconds, "peak_bytes": memory, "spearman_vs_cg": 1.0}}
    print(f"cg reference: {seconds:.1f} s")
    exact_by_method = {}
    for method in args.methods.split(","):
        (raw, relative), seconds, memory = measure(scores_with, method, {"rank": 64} if method == "arnoldi" else {})
        exact_by_method[method] = (raw, relative)
        out["methods"][method] = {"seconds": seconds, "peak_bytes": memory,
                                  "spearman_vs_cg": spearman(raw, reference),
                                  "l_relative_spearman_vs_cg": spearman(relative, reference)}
        print(f"{method:>9}: {seconds:7.1f} s, Spearman vs cg {out['methods'][method]['spearman_vs_cg']:.3f}")

    out["compression"] = []
    for base in ("identity", "ekfac"):
        curvature = fit_curvature(space, fit, CurvatureConfig(method=base, damping=damping))
        preconditioned_target = curvature.solve(target_gradient)
        uncompressed = -(gradients @ preconditioned_target)
        for spec in args.compress.split(","):
            compressor = Compressor.parse(spec)

            def sketched():
                return -(compressor(gradients) @ compressor(preconditioned_target))

            scores, seconds, memory = measure(sketched)
            row = {"curvature": base, "compression": spec, "dim": compressor.output_dim(space.size),
                   "seconds": seconds, "peak_bytes": memory,
                   "spearman_vs_uncompressed": spearman(scores, uncompressed)}
            out["compression"].append(row)
            print(f"  {base:>8} {spec:>11}: Spearman {row['spearman_vs_uncompressed']:.3f}, {seconds:.2f} s")

    groups = [targets[i::args.learned_targets] for i in range(args.learned_targets)]
    curvature = fit_curvature(space, fit, CurvatureConfig(method="ekfac", damping=damping))
    exact = torch.stack([normalised("l-relative", space.mean_gradient(g), gradients, curvature) for g in groups])
    start = time.perf_counter()
    features = slot_features(model, pool)
    feature_seconds = time.perf_counter() - start
    target_features = torch.stack([slot_features(model, g).mean(0) for g in groups])
    rows = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1))
    n_train = max(8, round(args.learned_fraction * len(pool)))
    train_rows, held_out = rows[:n_train], rows[n_train:]
    start = time.perf_counter()
    estimator = InfluenceEstimator(features.shape[1], EstimatorConfig()).fit(features[train_rows], target_features,
                                                                             exact[:, train_rows])
    fit_seconds = time.perf_counter() - start
    predicted = torch.stack([estimator.predict(features[held_out], t) for t in target_features])
    truth = exact[:, held_out]
    gradient_seconds = out["pool_gradients"]["seconds"]
    out["learned"] = {"train_rows": n_train, "held_out_pairs": truth.numel(),
                      "spearman": spearman(predicted, truth), "mse": float(((predicted - truth) ** 2).mean()),
                      "score_variance": float(truth.var()), "fit_seconds": fit_seconds,
                      "seconds_per_row_features": feature_seconds / len(pool),
                      "seconds_per_row_gradients": gradient_seconds / len(pool),
                      "cost_ratio": (gradient_seconds / len(pool)) / (feature_seconds / len(pool))}
    print(f"learned: held-out Spearman {out['learned']['spearman']:.3f} from {n_train} exact rows, "
          f"features {out['learned']['cost_ratio']:.1f}x cheaper than gradients per row")

    _, relative = exact_by_method.get("ekfac", (None, reference))
    top = torch.argsort(relative)[: args.top]
    conditions = {}
    for name, values in (("channel", pool_slots.channel), ("dmrs", pool_slots.dmrs_additional_position)):
        levels = sorted(set(values.tolist()))
        base = {str(v): float((values == v).mean()) for v in levels}
        picked = {str(v): float((values[top.numpy()] == v).mean()) for v in levels}
        conditions[name] = {"pool": base, f"top{args.top}": picked}
    for name, values in (("speed_mps", pool_slots.speed_mps), ("delay_spread_ns", pool_slots.delay_spread_ns),
                         ("snr_db", pool_slots.snr_db)):
        conditions[name] = {"pool_mean": float(values.mean()), f"top{args.top}_mean": float(values[top.numpy()].mean())}
    out["conditions"] = conditions
    print(json.dumps(conditions, indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
