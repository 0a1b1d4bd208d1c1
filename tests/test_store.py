import dataclasses
import sqlite3
import time

import numpy as np
import pytest

from service.serving.slot import ReceivedSlot
from service.serving.store import SampleStore, SlotLabel


def _slot(i: int, context: str = "c") -> ReceivedSlot:
    rng = np.random.default_rng(i)
    grid = (rng.standard_normal((2, 14, 12)) + 1j * rng.standard_normal((2, 14, 12))).astype(np.complex64)
    pilots = np.zeros((14, 12), np.complex64)
    pilots[2, ::2] = 1 + 1j
    mask = np.ones((14, 12), bool)
    mask[2] = False
    return ReceivedSlot(f"s{i}", context, grid, pilots, mask, 2, 0.1, dmrs_position=0)  # DMRS on symbol 2 only


def test_retention_keeps_the_newest_samples(tmp_path):
    store = SampleStore(tmp_path, max_samples=10)
    for i in range(25):
        store.capture(_slot(i), "v1")
    store.flush()
    assert store.count() == 10
    for i in range(15, 25):
        store.label(SlotLabel(f"s{i}", np.ones((13 * 12, 2), np.uint8), "genie", 3, 312))
    store.close()
    pool, ids = SampleStore(tmp_path).labelled()
    assert ids == [f"s{i}" for i in range(15, 25)]
    np.testing.assert_array_equal(pool.y[0], _slot(15).grid)
    assert pool.bits[0][~_slot(15).data_mask].sum() == 0 and pool.bits[0][_slot(15).data_mask, :2].all()
    assert np.allclose(pool.snr_db, 10.0)


def test_full_queue_drops_and_counts_without_waiting(tmp_path):
    dropped = []
    store = SampleStore(tmp_path, queue_size=4, on_dropped=lambda: dropped.append(1))
    blocker = sqlite3.connect(store.path, timeout=30)
    blocker.execute("BEGIN EXCLUSIVE")  # the writer blocks on its next commit
    store.capture(_slot(0), "v1")
    time.sleep(0.2)  # the writer has taken slot 0 and waits for the lock
    start = time.perf_counter()
    accepted = [store.capture(_slot(i), "v1") for i in range(1, 21)]
    assert time.perf_counter() - start < 0.5, "capture never waits"
    assert sum(accepted) == 4 and len(dropped) == 16
    blocker.rollback()
    blocker.close()
    store.close()
    assert SampleStore(tmp_path).count() == 5


def test_empty_pool_is_a_clear_error(tmp_path):
    with pytest.raises(LookupError, match="no labelled samples"):
        SampleStore(tmp_path).labelled(context="nobody")


def test_samples_read_back_in_arrival_order_whatever_order_they_were_captured(tmp_path):
    """Batcher workers finish batches out of order: the pool still lists slots as they arrived."""
    store = SampleStore(tmp_path)
    slots = [dataclasses.replace(_slot(i), arrival=100.0 + i) for i in range(6)]
    for slot in [slots[3], slots[4], slots[5], slots[0], slots[1], slots[2]]:  # the later batch finished first
        store.capture(slot, "v1")
        store.label(SlotLabel(slot.slot_id, np.ones((13 * 12, 2), np.uint8), "genie", 3, 312))
    store.close()
    _, ids = SampleStore(tmp_path).labelled()
    assert ids == [f"s{i}" for i in range(6)]
