"""Run a measurement in a forked child: its own peak memory, and a memory cap that fails it, not the machine."""
from __future__ import annotations

import multiprocessing as mp
import resource
import time

import torch


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
