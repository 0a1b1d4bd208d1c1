"""Side by side on one model, pool and target: this engine vs Kronfluence (EK-FAC), TRAK (BasicProjector)
and dattri (CG influence), each scored against this engine's ``cg`` reference.

The libraries are not project dependencies; install them in a separate environment:

    python3 -m venv .venv-bench && .venv-bench/bin/pip install torch==2.13.0 && .venv-bench/bin/pip install -e .
    .venv-bench/bin/pip install --no-deps kronfluence==1.0.1 && .venv-bench/bin/pip install accelerate einops \\
        einconv opt-einsum traker==0.3.2 dattri==0.3.0
    .venv-bench/bin/python benchmarks/influence_libraries.py --model models/small --pool POOL.h5 --targets T.h5

Every library is asked for the influence of up-weighting each pool slot on the target slots' mean
BCE-in-bits loss, over the convolution weights and biases (batch norm frozen). Sign conventions
differ (Kronfluence and TRAK report "helpful" as positive); scores are mapped to this engine's
convention (negative = beneficial) before the Spearman correlation.

Known limitation found by reading Kronfluence 1.0.1 (``module/conv2d.py: extract_patches``): for
``groups > 1`` it averages the input over channel groups before unfolding, so for DeepRx's
depthwise convolutions every channel's kernel is paired with the channel-mean input patch instead
of its own input. The per-sample gradients and K-FAC factors it forms for those layers are not
DeepRx's; it runs, but on a different quantity.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_workload_arguments, freeze_batch_norm, load_workload, measure  # noqa: E402
from service.influence.curvature import CurvatureConfig, default_damping  # noqa: E402
from service.influence.gradients import ParameterSpace  # noqa: E402
from service.influence.inverse import fit_curvature  # noqa: E402
from service.influence.learned import spearman  # noqa: E402
from service.influence.scores import influence  # noqa: E402
from service.receiver.checkpoint import load_checkpoint  # noqa: E402
from service.receiver.features import SlotTensors  # noqa: E402
from service.receiver.loss import per_slot_bce_bits  # noqa: E402


class SlotDataset(Dataset):
    def __init__(self, data: SlotTensors):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        d = self.data
        return d.features[i], d.bits_per_symbol[i], d.labels[i], d.valid[i]


def run_kronfluence(model, pool: SlotTensors, targets: SlotTensors, damping: float, workdir: Path) -> torch.Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    conv_modules = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]

    class BitLossTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            features, k, labels, valid = batch
            logits = model(features, k)
            if sample:
                with torch.no_grad():
                    labels = torch.bernoulli(torch.sigmoid(logits))
            return per_slot_bce_bits(logits, labels, valid).sum()

        def compute_measurement(self, batch, model):
            features, k, labels, valid = batch
            return per_slot_bce_bits(model(features, k), labels, valid).sum()

        def get_influence_tracked_modules(self):
            return conv_modules

    task = BitLossTask()
    model = prepare_model(model, task)
    analyzer = Analyzer("deeprx", model, task, cpu=True, output_dir=str(workdir / "kronfluence"),
                        disable_tqdm=True)
    analyzer.fit_all_factors("ekfac", SlotDataset(pool), per_device_batch_size=32,
                             factor_args=FactorArguments(strategy="ekfac"), overwrite_output_dir=True)
    analyzer.compute_pairwise_scores("scores", "ekfac", SlotDataset(targets), SlotDataset(pool),
                                     per_device_query_batch_size=len(targets), per_device_train_batch_size=64,
                                     score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
    scores = analyzer.load_pairwise_scores("scores")["all_modules"]  # [Q, N], positive = helpful
    return -scores.mean(0)


def run_trak(model, pool: SlotTensors, targets: SlotTensors, proj_dim: int, damping: float,
             workdir: Path) -> torch.Tensor:
    from trak import TRAKer
    from trak.modelout_functions import AbstractModelOutput
    from trak.projectors import BasicProjector, ProjectionType

    class NegativeBitLoss(AbstractModelOutput):
        """Model output f = -loss(z); d loss / d f = -1, constant (so the out-to-loss weight is 1)."""

        def __init__(self):
            super().__init__()

        def get_output(self, model, weights, buffers, features, k, labels, valid):
            logits = torch.func.functional_call(model, (weights, buffers), (features[None], k[None]))
            return -per_slot_bce_bits(logits, labels[None], valid[None])[0]

        def get_out_to_loss_grad(self, model, weights, buffers, batch):
            return torch.ones(batch[0].shape[0], 1)

    space = ParameterSpace.convolutions(model)
    grad_dim = space.size
    projector = BasicProjector(grad_dim=grad_dim, proj_dim=proj_dim, seed=0, proj_type=ProjectionType.normal,
                               device="cpu", dtype=torch.float32)
    traker = TRAKer(model=model, task=NegativeBitLoss(), train_set_size=len(pool), projector=projector,
                    proj_dim=proj_dim, device="cpu", save_dir=str(workdir / "trak"), use_half_precision=False,
                    grad_wrt=space.names, lambda_reg=damping * len(pool))  # TRAK sums where G averages
    traker.load_checkpoint(model.state_dict(), model_id=0)
    for batch in DataLoader(SlotDataset(pool), batch_size=32):
        traker.featurize(batch=batch, num_samples=batch[0].shape[0])
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="target", checkpoint=model.state_dict(), model_id=0,
                                    num_targets=len(targets))
    for batch in DataLoader(SlotDataset(targets), batch_size=len(targets)):
        traker.score(batch=batch, num_samples=batch[0].shape[0])
    scores = torch.as_tensor(traker.finalize_scores(exp_name="target"))  # [N, Q], positive = helpful
    return -scores.mean(1)


def run_dattri(model, pool: SlotTensors, targets: SlotTensors, damping: float, iterations: int) -> torch.Tensor:
    from dattri.algorithm.influence_function import IFAttributorCG
    from dattri.task import AttributionTask

    def loss_func(params, data):
        features, k, labels, valid = data  # dattri passes one sample, with or without a batch axis
        batch = (features.reshape(-1, *features.shape[-3:]), k.reshape(-1))
        logits = torch.func.functional_call(model, params, batch)
        return per_slot_bce_bits(logits, labels.reshape(logits.shape), valid.reshape(logits.shape)).mean()

    task = AttributionTask(loss_func=loss_func, model=model, checkpoints=model.state_dict())
    attributor = IFAttributorCG(task=task, max_iter=iterations, regularization=damping)
    train_loader = DataLoader(SlotDataset(pool), batch_size=32)
    attributor.cache(train_loader)
    scores = attributor.attribute(train_loader, DataLoader(SlotDataset(targets), batch_size=len(targets)))
    return torch.as_tensor(scores).mean(1)  # [N, Q]: dattri's IF score is the loss change, as here


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--proj-dim", type=int, default=4096)
    parser.add_argument("--libraries", default="engine,kronfluence,trak,dattri")
    parser.add_argument("--memory-limit-gb", type=float, default=12.0, help="address-space cap per library run")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # internal: run one library in this process
    parser.add_argument("--out-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = load_workload(args)
    model, space, pool, targets, fit = work.model, work.space, work.pool, work.targets, work.fit
    freeze_batch_norm(model)
    damping = default_damping(space, fit, CurvatureConfig())
    workdir = Path(tempfile.mkdtemp(prefix="influence-libraries-"))
    if args.only:  # a child run: one library, scores and cost to files
        runners = {
            "engine": lambda: influence(space.mean_gradient(targets), space.per_sample_gradients(pool),
                                        fit_curvature(space, fit, CurvatureConfig(method="ekfac", damping=damping))),
            "kronfluence": lambda: run_kronfluence(load_checkpoint(args.model).model.eval(), pool, targets, damping,
                                                   workdir),
            "trak": lambda: run_trak(model, pool, targets, args.proj_dim, damping, workdir),
            "dattri": lambda: run_dattri(model, pool, targets, damping, args.cg_iterations),
        }
        scores, seconds, memory = measure(runners[args.only])
        np.save(args.out_dir / f"{args.only}.npy", scores.float().numpy())
        (args.out_dir / f"{args.only}.json").write_text(json.dumps({"seconds": seconds, "peak_bytes": memory}))
        return 0
    start = time.perf_counter()
    gradients = space.per_sample_gradients(pool)
    target_gradient = space.mean_gradient(targets)
    gradient_seconds = time.perf_counter() - start
    start = time.perf_counter()
    reference = influence(target_gradient, gradients, fit_curvature(
        space, fit, CurvatureConfig(method="cg", damping=damping, cg_iterations=args.cg_iterations)))
    results = {"reference": {"method": "engine cg", "seconds": gradient_seconds + time.perf_counter() - start}}
    limit = int(args.memory_limit_gb * 2**30)
    for name in args.libraries.split(","):
        # a fresh process per library: its own memory cap, and no fork of a process running OpenMP threads
        child = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--only", name, "--out-dir", str(workdir)],
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)),
            capture_output=True, text=True)
        if child.returncode != 0:
            error = (child.stderr.strip().splitlines() or ["exit code %d" % child.returncode])[-1][:300]
            results[name] = {"error": error}
            print(f"{name:>12}: failed: {error}")
            continue
        scores = torch.from_numpy(np.load(workdir / f"{name}.npy"))
        cost = json.loads((workdir / f"{name}.json").read_text())
        seconds, memory = cost["seconds"], cost["peak_bytes"]
        results[name] = {"seconds": seconds, "peak_bytes": memory, "pool_per_second": len(pool) / seconds,
                         "spearman_vs_cg": spearman(scores.float(), reference.float())}
        print(f"{name:>12}: {seconds:8.1f} s ({len(pool) / seconds:7.1f} pool slots/s), "
              f"peak {memory / 2**20:7.0f} MiB, Spearman vs cg {results[name]['spearman_vs_cg']:.3f}")
    if args.json:
        args.json.write_text(json.dumps({"pool": len(pool), "targets": len(targets), "damping": damping,
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
