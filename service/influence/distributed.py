"""Gradient-index builds sharded over Ray workers, for pools too large for one machine's time.

:class:`RayShards` is a :data:`~service.influence.index.Sharding` runner: the driver fits H once (as
any build does), puts the model, the fitted inverse curvature and the sketch in Ray's object store,
and runs :func:`~service.influence.index.pool_rows` on contiguous, chunk-aligned runs of pool rows as
Ray tasks (one CPU each). Each worker thus computes exactly the chunks the single-process build
computes, with the same weights, the same ``H^-1`` and the same sketch seed; the driver writes one
shard file per task, in pool order, as results come back (at most ``2 x workers`` tasks in flight, so
the driver holds a few shards, never the whole pool or all rows), then the manifest, once, as
``GradientIndex.build`` does. The index format and the query path are unchanged; the manifest just
lists more shards. A task whose worker dies is retried by Ray.

Ray is optional (``pip install 'deeprx-adapt[ray]'``): it is imported here only when a runner is made.
Cluster nodes need this project and its dependencies installed (the same environment as the driver).

:class:`SlotFile` reads pool rows from the HDF5 file when they are asked for, so the driver never
loads the whole pool either: only the fit slots and the shards in flight.
"""
from __future__ import annotations

import math
import os
import resource
import socket
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from schema.dataset import SlotBatch, read_slots
from service.influence.compress import Compressor
from service.influence.curvature import InverseCurvature
from service.influence.index import pool_rows
from service.receiver.model import DeepRx

MAX_SHARD_ROWS = 1024  # rows per task: ~16 MiB of sjlt:4096 rows, ~20 s of one core on the small model


class SlotFile:
    """The rows of an HDF5 slot dataset, read on ``select`` (a lazy stand-in for a ``SlotBatch`` pool)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        read_slots(self.path, slice(0, 0))  # fails early on a missing file or another schema version
        with h5py.File(self.path, "r") as file:
            self._len = len(file["y"])

    def __len__(self) -> int:
        return self._len

    def select(self, index) -> SlotBatch:
        """Rows ``index`` (a slice or integer positions, any order) as an in-memory batch."""
        if isinstance(index, slice):
            return read_slots(self.path, index)[0]
        index = np.asarray(index, dtype=np.int64)
        rows = np.unique(index)  # HDF5 reads increasing positions
        return read_slots(self.path, rows)[0].select(np.searchsorted(rows, index))


def _parse_address(address: str) -> tuple[str | None, int | None]:
    """``local`` -> (None, cpu count); ``local:N`` -> (None, N); anything else -> (address, None)."""
    if address == "local" or address.startswith("local:"):
        count = address.partition(":")[2]
        if count and (not count.isdigit() or int(count) < 1):
            raise ValueError(f"--ray '{address}': local:N needs a positive worker count N")
        return None, int(count) if count else (os.cpu_count() or 1)
    if not address:
        raise ValueError("--ray needs a Ray cluster address, 'local' or 'local:N'")
    return address, None


def _ray():
    try:
        import ray
    except ImportError:
        raise ModuleNotFoundError("sharding over Ray needs the 'ray' package: pip install 'deeprx-adapt[ray]' "
                                  "(or pip install ray)") from None
    return ray


def _shard_rows(state: tuple[DeepRx, InverseCurvature, Compressor | None], shard: SlotBatch, chunk: int,
                threads: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A Ray task: the index rows of one run of pool rows (``pool_rows``, as in the single-process build)."""
    began = time.perf_counter()
    torch.set_num_threads(threads)
    model, curvature, compressor = state
    shard = shard.select(np.arange(len(shard)))  # writable copies of the object store's read-only arrays
    rows, self_influence = pool_rows(model, curvature, compressor, shard, chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return rows, self_influence, {"rows": len(shard), "seconds": time.perf_counter() - began,
                                  "host": socket.gethostname(), "pid": os.getpid(), "peak_rss_mib": peak}


@dataclass
class RayShards:
    """Run index rows as Ray tasks. ``address``: a Ray cluster address (``ray://host:10001``, ``host:6379``
    or ``auto``), or ``local`` / ``local:N`` to start a local Ray instance with N worker CPUs (``local``:
    this machine's cores) and stop it afterwards. If this process is already connected to Ray
    (``ray.init`` was called), that session is used as it is and left running.

    ``shard_rows``: pool rows per task, rounded up to whole chunks (default: the pool split evenly over
    the workers, at most :data:`MAX_SHARD_ROWS`). ``stats`` gets one dict per task (rows, seconds,
    host, pid, the worker's peak resident MiB)."""

    address: str = "local"
    shard_rows: int | None = None
    cpus_per_task: int = 1
    object_store_mib: int | None = None  # local instances only (Ray's default: 30% of memory)
    stats: list[dict] = field(default_factory=list)
    workers: int = 0  # known once connected

    def __post_init__(self) -> None:
        self._cluster, self._local_cpus = _parse_address(self.address)
        if self.cpus_per_task < 1:
            raise ValueError("cpus_per_task must be at least 1")
        _ray()

    def _connect(self, ray) -> bool:
        """Connect (or start a local instance); True when this runner must shut Ray down afterwards."""
        if ray.is_initialized():
            return False
        if self._cluster is not None:
            ray.init(address=self._cluster, log_to_driver=False)
        else:
            store = self.object_store_mib * 2 ** 20 if self.object_store_mib else None
            ray.init(num_cpus=self._local_cpus, include_dashboard=False, object_store_memory=store,
                     _node_ip_address="127.0.0.1", log_to_driver=False)
        return True

    def shard_size(self, pool_rows: int, chunk: int) -> int:
        rows = self.shard_rows or min(MAX_SHARD_ROWS, math.ceil(pool_rows / max(1, self.workers)))
        return max(1, math.ceil(rows / chunk)) * chunk

    def __call__(self, model: DeepRx, curvature: InverseCurvature, compressor: Compressor | None, pool: SlotBatch,
                 ids: list[str], chunk: int, progress: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        ray = _ray()
        started = self._connect(ray)
        try:
            self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)) // self.cpus_per_task)
            size = self.shard_size(len(pool), chunk)
            state = ray.put((model, curvature, compressor))  # one copy; pickled together, so shared modules stay shared
            task = ray.remote(num_cpus=self.cpus_per_task)(_shard_rows)
            starts = deque(range(0, len(pool), size))
            in_flight: deque = deque()
            with tqdm(total=len(pool), desc=f"index ({self.workers} Ray workers)", unit="slot",
                      disable=not progress) as bar:
                while starts or in_flight:
                    while starts and len(in_flight) < 2 * self.workers:
                        start = starts.popleft()
                        shard = pool.select(slice(start, start + size))
                        in_flight.append((start, task.remote(state, shard, chunk, self.cpus_per_task)))
                    start, ref = in_flight.popleft()  # in pool order: shard files are named in that order
                    rows, self_influence, stats = ray.get(ref)
                    self.stats.append({"start": start, **stats})
                    bar.update(len(rows))
                    yield rows, self_influence, list(ids[start:start + len(rows)])
        finally:
            if started:
                ray.shutdown()
