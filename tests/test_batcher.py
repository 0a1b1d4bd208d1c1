"""The dynamic batcher through its public interface: futures of both kinds, per-batch bookkeeping."""
import asyncio
import threading

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from schema.dataset import read_slots
from service.receiver.model import DeepRx, config_for
from service.serving.backend import TorchBackend
from service.serving.batcher import DynamicBatcher, run_batch
from service.serving.metrics import ServiceMetrics
from service.serving.registry import ModelVersion
from service.serving.slot import ReceivedSlot


@pytest.fixture(scope="module")
def version() -> ModelVersion:
    torch.manual_seed(0)
    model = DeepRx(config_for("tiny")).eval()
    return ModelVersion("v1", model, {}, TorchBackend(model))


def received(slots, count: int) -> list[ReceivedSlot]:
    return [ReceivedSlot(f"s{i}", "c", slots.y[i], slots.pilots[i], slots.data_mask[i], int(slots.bits_per_symbol[i]),
                         float(10 ** (-slots.snr_db[i] / 10)), int(slots.dmrs_additional_position[i]))
            for i in range(count)]


def test_asyncio_futures_resolve_on_their_loop_with_each_slots_llrs(version, train_mix_file):
    """Slots submitted from an event loop get their own LLRs, set on that loop (not on the worker)."""
    slots = received(read_slots(train_mix_file)[0], 12)
    expected = [run_batch([slot], version)[0] for slot in slots]
    batcher = DynamicBatcher(ServiceMetrics(CollectorRegistry()), max_batch_size=5)

    async def submit_all() -> tuple[list[np.ndarray], set[int]]:
        loop = asyncio.get_running_loop()
        threads: set[int] = set()
        futures = [batcher.submit(slot, version, loop.create_future()) for slot in slots]
        for future in futures:
            future.add_done_callback(lambda _: threads.add(threading.get_ident()))
        return await asyncio.gather(*futures), threads

    try:
        results, threads = asyncio.run(submit_all())
    finally:
        batcher.close()
    assert threads == {threading.main_thread().ident}
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_bookkeeping_sees_each_batch_before_its_results_and_cannot_lose_them(version, train_mix_file):
    """``on_batch`` gets every slot once, with the LLRs its request gets, while the request's future is
    still pending; when it fails, the requests still get their results."""
    slots = received(read_slots(train_mix_file)[0], 10)
    recorded: dict[str, np.ndarray] = {}
    futures: dict[str, object] = {}
    done_early: list[str] = []

    def on_batch(batch_slots, batch_version, llrs):
        assert batch_version is version
        # a future not yet handed back to its caller cannot be done either
        done_early.extend(s.slot_id for s in batch_slots if s.slot_id in futures and futures[s.slot_id].done())
        recorded.update({slot.slot_id: x for slot, x in zip(batch_slots, llrs)})
        if len(recorded) > 6:
            raise RuntimeError("a broken store")

    batcher = DynamicBatcher(ServiceMetrics(CollectorRegistry()), max_batch_size=4, on_batch=on_batch)
    try:
        for slot in slots:
            futures[slot.slot_id] = batcher.submit(slot, version)
        results = {slot_id: future.result(timeout=60) for slot_id, future in futures.items()}
    finally:
        batcher.close()
    assert done_early == []
    assert sorted(recorded) == sorted(results)
    for slot_id, result in results.items():
        np.testing.assert_array_equal(recorded[slot_id], result)


def test_workers_run_batches_at_once(version, train_mix_file):
    """Two workers hold two batches at the same time (each waits in ``on_batch`` for the other), and
    every slot still gets its own LLRs."""
    slots = received(read_slots(train_mix_file)[0], 6)
    expected = {slot.slot_id: run_batch([slot], version)[0] for slot in slots}
    both_running = threading.Barrier(2, timeout=30)
    met: list[bool] = []

    def on_batch(batch_slots, batch_version, llrs):
        if not met:  # the first two batches: one worker alone would break the barrier after 30 s
            try:
                both_running.wait()
                met.append(True)
            except threading.BrokenBarrierError:
                met.append(False)

    batcher = DynamicBatcher(ServiceMetrics(CollectorRegistry()), max_batch_size=1, workers=2, on_batch=on_batch)
    try:
        futures = {slot.slot_id: batcher.submit(slot, version) for slot in slots}
        results = {slot_id: future.result(timeout=60) for slot_id, future in futures.items()}
    finally:
        batcher.close()
    assert met[:2] == [True, True]
    for slot_id, result in results.items():
        np.testing.assert_allclose(result, expected[slot_id], atol=1e-5)
