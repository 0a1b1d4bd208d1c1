"""Torch thread counts per server thread: only the threads with heavy torch work run it on several
cores (service/serving/threads.py says why)."""
import threading

import pytest
import torch

from service.serving.threads import serve_single_threaded, start_pinned_thread


def _count_in_new_thread() -> int:
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return seen[0]


@pytest.fixture
def single_threaded():
    before = serve_single_threaded()
    yield
    torch.set_num_threads(before)


def test_a_pinned_thread_keeps_its_count_and_threads_started_later_keep_the_default(single_threaded):
    go, seen = threading.Event(), {}

    def heavy():
        go.wait()
        x = torch.ones(128, 128)
        (x @ x).sum()
        seen["pinned"] = torch.get_num_threads()

    thread, count = start_pinned_thread(heavy, "test-heavy", 2)
    seen["later"] = _count_in_new_thread()  # started after the pin, before the pinned thread's work
    go.set()
    thread.join()
    assert count == 2
    assert seen == {"pinned": 2, "later": 1}
    assert torch.get_num_threads() == 1


def test_the_server_runs_torch_on_one_thread_but_in_its_adaptation_worker(tmp_path, tiny_checkpoint):
    from service.adaptation.worker import AdaptationConfig
    from service.config import ServerConfig
    from service.server import ReceiverServer

    before = torch.get_num_threads()
    server = ReceiverServer(ServerConfig(port=0, metrics_port=0, adaptation=AdaptationConfig(threads=2)),
                            tmp_path / "store", tiny_checkpoint).start()
    try:
        assert server.worker.torch_threads == 2
        assert _count_in_new_thread() == 1
        assert torch.get_num_threads() == 1
    finally:
        server.stop(grace=2)
    assert torch.get_num_threads() == before
    assert _count_in_new_thread() == before
