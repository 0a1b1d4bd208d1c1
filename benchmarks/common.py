"""What the influence benchmarks share: the workload (model, pool, targets, fit set) and measuring a
call's wall time and peak resident memory."""
from __future__ import annotations

import argparse
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from schema.dataset import SlotBatch, read_slots
from service.influence.gradients import ParameterSpace
from service.receiver.checkpoint import load_checkpoint
from service.receiver.features import SlotTensors, prepare
from service.receiver.model import DeepRx

ROOT = Path(__file__).resolve().parents[1]


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "small")
    parser.add_argument("--pool", type=Path, required=True)
    parser.add_argument("--targets", type=Path, required=True)
    parser.add_argument("--pool-slots", type=int, default=2000)
    parser.add_argument("--target-slots", type=int, default=32)
    parser.add_argument("--fit-slots", type=int, default=256)
    parser.add_argument("--cg-iterations", type=int, default=100)


@dataclass
class Workload:
    model: DeepRx
    space: ParameterSpace
    pool_slots: SlotBatch
    target_attrs: dict
    pool: SlotTensors
    targets: SlotTensors
    fit: SlotTensors  # a seeded random subset of the pool that curvature is fitted on


def load_workload(args: argparse.Namespace) -> Workload:
    model = load_checkpoint(args.model).model.eval()
    pool_slots, _ = read_slots(args.pool, slice(0, args.pool_slots))
    target_slots, target_attrs = read_slots(args.targets, slice(0, args.target_slots))
    pool = prepare(pool_slots)
    fit = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(0))[: args.fit_slots]]
    return Workload(model, ParameterSpace.convolutions(model), pool_slots, target_attrs, pool,
                    prepare(target_slots), fit)


def freeze_batch_norm(model: torch.nn.Module) -> None:
    """Influence is over the convolutions only: batch-norm scales and shifts get no gradient."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            for p in module.parameters():
                p.requires_grad_(False)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def measure(fn, *args):
    """``fn(*args)`` in this process; returns (result, seconds, peak extra resident bytes), the peak
    sampled every 5 ms by a thread. (No fork: forking after torch started its OpenMP threads hangs.)"""
    start_rss = _rss_bytes()
    peak = [start_rss]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        result = fn(*args)
    finally:
        seconds = time.perf_counter() - start
        done.set()
        sampler.join()
    return result, seconds, max(0, max(peak[0], _rss_bytes()) - start_rss)
