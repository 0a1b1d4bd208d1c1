"""Which of the server's threads run torch's CPU ops on several cores.

Every Python thread that runs torch CPU ops gets an OpenMP team of its own, sized by the torch
thread count when the thread first uses torch. When the process holds more team threads than it
has cores, libgomp stops spinning between parallel regions and each op waits for its team to
wake: the adaptation job's fine-tuning step took 0.31-0.34 s on the worker thread while the main
thread held a 2-thread team, 0.15 s when the worker's was the only one (2 cores, README
"Adaptation job"). So the server runs torch single-threaded (`serve_single_threaded`) and gives
more threads only to the thread whose torch work is heavy (`start_pinned_thread`): the adaptation
worker, and the batcher when it serves eager PyTorch on the CPU.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch

_PINNING = threading.Lock()  # one thread sets its count at a time


def serve_single_threaded() -> int:
    """Make 1 the torch thread count of the calling thread and of threads that start using torch
    later. Call before the process's first torch op: a team made earlier stays. Returns the calling
    thread's previous count (to restore)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    return previous


def start_pinned_thread(target: Callable[[], None], name: str, threads: int) -> tuple[threading.Thread, int]:
    """Start a daemon thread that runs ``target()`` with its torch CPU ops on ``threads`` threads (0:
    one per core), leaving the count other threads start with as it was. Returns the thread and its
    count once the count is set (threads pinned one after another each restore the right count)."""
    counts: list[int] = []
    pinned = threading.Event()

    def run() -> None:
        try:
            counts.append(_pin(threads))
        finally:
            pinned.set()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    with _PINNING:
        thread.start()
        pinned.wait()
    if not counts:
        raise RuntimeError(f"thread '{name}' could not set its torch threads")
    return thread, counts[0]


def _pin(threads: int) -> int:
    """Set the calling thread's torch thread count before its first torch op, keep the process-wide one.

    torch keeps one process-wide count that each thread copies on its first torch op, and
    ``torch.set_num_threads`` sets both the caller's own count and that process-wide one. So this
    thread takes its copy first (which reads the process-wide count), sets its own, and a short
    helper thread, which runs no op, sets the process-wide count back.
    """
    default = torch.get_num_threads()  # this thread's first torch call: its copy of the process-wide count
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))  # 0: the cores this process may use
    restore = threading.Thread(target=torch.set_num_threads, args=(default,), name="torch-threads-restore")
    restore.start()
    restore.join()
    return torch.get_num_threads()
