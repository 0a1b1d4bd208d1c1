"""What the influence benchmarks share: the workload (model, pool, targets, fit set) and running a
measurement in a forked child (its own peak memory, and a memory cap that fails it, not the machine)."""
from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from schema.dataset import SlotBatch, read_slots
from service.checkpoint import load_checkpoint
from service.features import SlotTensors, prepare
from service.influence.gradients import ParameterSpace
from service.model import DeepRx

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


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def _to_numpy(value):
    return tuple(map(_to_numpy, value)) if isinstance(value, tuple) else value.detach().numpy()


def _to_torch(value):
    return tuple(map(_to_torch, value)) if isinstance(value, tuple) else torch.from_numpy(value)


def run_in_child(fn, *args, memory_limit_bytes: int | None = None):
    """``fn(*args)`` in a forked child. Returns (result, seconds, peak extra bytes); raises RuntimeError
    with the child's error if it failed (a capped child that runs out of memory fails this way).
    Tensors come back as numpy through the pipe (torch's fd sharing needs the child alive)."""
    context = mp.get_context("fork")
    queue = context.SimpleQueue()

    def child():
        try:
            if memory_limit_bytes:
                resource.setrlimit(resource.RLIMIT_AS, (memory_limit_bytes, memory_limit_bytes))
            start_rss = _rss_bytes()
            start = time.perf_counter()
            result = _to_numpy(fn(*args))
            seconds = time.perf_counter() - start
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            queue.put(("ok", result, seconds, max(0, peak - start_rss)))
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            queue.put(("error", f"{type(err).__name__}: {err}"[:500], 0.0, 0))

    process = context.Process(target=child)
    process.start()
    status, result, seconds, memory = queue.get()
    process.join()
    if status == "error":
        raise RuntimeError(result)
    return _to_torch(result), seconds, memory
