from service.monitoring.monitor import FeedbackMonitor, TargetRule


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
