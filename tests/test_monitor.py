import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from schema.dataset import read_slots
from service.api.observer import SlotObserver
from service.monitoring.monitor import FeedbackMonitor, TargetRule
from service.monitoring.pilots import pilot_sinr_db
from service.serving.metrics import ServiceMetrics
from service.serving.slot import ReceivedSlot


def test_a_context_becomes_a_target_after_enough_slots_above_threshold():
    monitor = FeedbackMonitor(window_slots=100)
    rule = TargetRule(absolute_ber=0.05, relative_to_genie=None, min_slots=20)
    for _ in range(19):
        monitor.record("bad", errors=80, bits=1000)
        monitor.record("good", errors=10, bits=1000)
    assert monitor.targets(rule) == {}, "not enough slots yet"
    monitor.record("bad", errors=80, bits=1000)
    monitor.record("good", errors=10, bits=1000)
    targets = monitor.targets(rule)
    assert list(targets) == ["bad"] and abs(targets["bad"].ber - 0.08) < 1e-12


def test_relative_to_genie_flags_contexts_far_from_the_reference():
    monitor = FeedbackMonitor(window_slots=50)
    rule = TargetRule(absolute_ber=0.5, relative_to_genie=1.5, min_slots=10)
    for _ in range(10):
        monitor.record("drift", errors=40, bits=1000, genie_errors=10)  # 4x genie
        monitor.record("fine", errors=12, bits=1000, genie_errors=10)  # 1.2x genie
        monitor.record("unreported", errors=40, bits=1000)
    assert set(monitor.targets(rule)) == {"drift"}
    assert monitor.window("drift").genie_ber == 0.01 and monitor.window("unreported").genie_ber is None


def test_windows_forget_old_slots():
    monitor = FeedbackMonitor(window_slots=5)
    for _ in range(5):
        monitor.record("c", errors=100, bits=100)
    for _ in range(5):
        monitor.record("c", errors=0, bits=100)
    assert monitor.window("c").ber == 0.0 and monitor.window("c").slots == 5


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")  # the thread must end cleanly
def test_observer_windows_equal_the_per_slot_means_of_each_context(train_mix_file):
    """The observer records queued slots in groups (estimates in one pass per pilot layout); each
    context's window is still the mean of its own last ``window_slots`` slots, in arrival order."""
    slots, _ = read_slots(train_mix_file)
    rng = np.random.default_rng(0)
    monitor = FeedbackMonitor(window_slots=7)
    observer = SlotObserver(monitor, ServiceMetrics(CollectorRegistry()))
    seen: dict[str, list[tuple[float, float]]] = {"a": [], "b": []}
    batch: tuple[list, list] = ([], [])
    for i in range(40):
        row = i % len(slots.y)
        context = "a" if i % 3 else "b"
        grid, pilots = slots.y[row], slots.pilots[row]
        llrs = rng.normal(0, 4, size=(100, 4)).astype(np.float32)
        batch[0].append(ReceivedSlot(f"s{i}", context, grid, pilots, slots.data_mask[row], 4, 0.1,
                                     int(slots.dmrs_additional_position[row])))
        batch[1].append(llrs)
        if i % 5 in (1, 4):  # batches of 2 and 3 slots, as the batcher hands them over
            observer.observe(*batch)
            batch = ([], [])
        seen[context].append((float((1 / (1 + np.exp(np.abs(llrs.astype(np.float64))))).mean()),
                              pilot_sinr_db(grid, pilots)))
    observer.flush()
    observer.close()
    assert len({(slots.pilots[i % len(slots.y)] != 0).tobytes() for i in range(40)}) > 1, "mixed pilot layouts"
    for context, values in seen.items():
        expected = np.mean(values[-7:], axis=0)
        got = monitor.estimate(context)
        assert np.allclose([got.expected_ber, got.pilot_sinr_db], expected, rtol=1e-9)
