"""Why dattri's CG influence does not fit in 12 GB on DeepRx: measure where its memory goes.

dattri 0.3.0 ``IFAttributorCG.transform_test_rep`` runs, for every batch of the training loader,
``ihvp_at_x_cg`` on the whole [Q, P] block of target gradients, and that function is
``vmap(_cg)(v)``: conjugate gradient vmapped over the Q target vectors, each iteration a Hessian-
vector product by double reverse-mode autodiff (``mode="rev-rev"``: ``vjp`` of ``grad``) of the
loss on one training batch. vmap gives every tensor of that double-backward graph a Q-fold batch
axis, so peak memory grows linearly in Q x (slots per training batch) x (activation size).

This script measures one CG iteration on one 32-slot training batch for Q = 1, 2, 4, 8, 32 target
vectors (32: the benchmark's target set), each in a fresh process (peak resident memory does not
shrink inside one), and fits the per-vector slope. dattri repeats such a solve ``max_iter`` times
for every batch of the training loader (and sums the per-batch results, i.e. sum_b H_b^-1 v rather
than H^-1 v). Run in ``.venv-bench`` (see ``influence_libraries.py``):

    .venv-bench/bin/python benchmarks/dattri_memory.py --pool data/pool-2000.h5 --targets data/eval-drift-highspeed.h5
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_workload_arguments, freeze_batch_norm, load_workload, measure  # noqa: E402
from service.receiver.loss import per_slot_bce_bits  # noqa: E402


def one_cg_iteration(args: argparse.Namespace) -> dict:
    from dattri.func.hessian import ihvp_at_x_cg

    work = load_workload(args)
    model = work.model
    freeze_batch_norm(model)
    trained = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    batch = work.pool[: args.batch_slots]
    buffers = dict(model.named_buffers())
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in trained}

    def loss(flat: torch.Tensor) -> torch.Tensor:  # as dattri's task does: one flat parameter vector
        values = dict(zip(trained, flat.split([p.numel() for p in trained.values()])))
        params = {n: values[n].view_as(p) for n, p in trained.items()}
        logits = torch.func.functional_call(model, {**frozen, **buffers, **params}, (batch.features, batch.bits_per_symbol))
        return per_slot_bce_bits(logits, batch.labels, batch.valid).mean()

    flat = torch.cat([p.reshape(-1) for p in trained.values()])
    vectors = torch.randn(args.vectors, flat.numel())
    ihvp = ihvp_at_x_cg(loss, flat, max_iter=1, regularization=1e-3)
    _, seconds, peak = measure(ihvp, vectors)
    return {"vectors": args.vectors, "seconds": seconds, "peak_bytes": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--batch-slots", type=int, default=32, help="slots per training batch (dattri loader)")
    parser.add_argument("--counts", default="1,2,4,8,32", help="numbers of target vectors to measure")
    parser.add_argument("--vectors", type=int, help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.vectors:
        print(json.dumps(one_cg_iteration(args)))
        return 0
    rows = []
    for count in (int(c) for c in args.counts.split(",")):
        child = ["--model", args.model, "--pool", args.pool, "--targets", args.targets,
                 "--pool-slots", args.batch_slots, "--batch-slots", args.batch_slots, "--vectors", count]
        done = subprocess.run([sys.executable, __file__, *map(str, child)], capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"Q={count}: one CG iteration {rows[-1]['seconds']:.1f} s, peak {rows[-1]['peak_bytes'] / 2**30:.2f} GiB")
    counts = np.array([r["vectors"] for r in rows], dtype=float)
    peaks = np.array([r["peak_bytes"] for r in rows], dtype=float)
    slope, intercept = np.polyfit(counts, peaks, 1)
    print(f"per target vector: {slope / 2**30:.2f} GiB (+ {intercept / 2**30:.2f} GiB)")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "bytes_per_vector": slope, "bytes_intercept": intercept},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
