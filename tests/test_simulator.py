import numpy as np
import pytest

from client.simulator import SlotSimulator
from schema.dataset import SlotBatch, read_slots
from schema.scenario import parse_scenario


def _simulate(spec: str, slots: int, seed: int) -> SlotBatch:
    return SlotBatch.concatenate(list(SlotSimulator(parse_scenario(spec), seed=seed).batches(slots)))


@pytest.mark.parametrize("spec, rx, subcarriers, k", [
    ("channel=TDL-A,mod=qpsk,rx=1,prb=2", 1, 24, 2),
    ("channel=CDL-D,mod=64qam,rx=4,prb=3,scs=15,dmrs=3", 4, 36, 6),
    ("channel=CDL-A,mod=16qam,rx=2,prb=4", 2, 48, 4),
])
def test_slot_shapes_and_bit_layout(spec, rx, subcarriers, k):
    b = _simulate(spec, 8, seed=0)
    assert b.y.shape == (8, rx, 14, subcarriers) and b.y.dtype == np.complex64
    assert b.pilots.shape == b.data_mask.shape == (8, 14, subcarriers)
    assert b.bits.shape == (8, 14, subcarriers, 6)
    assert np.all(b.bits_per_symbol == k)
    assert np.all(b.bits[..., k:] == 0), "bits beyond the modulation are padding"
    assert np.all(b.bits[~b.data_mask] == 0), "no bits on DMRS REs"
    assert np.all(b.num_bits == b.data_mask[0].sum() * k)
    assert np.all(b.pilots[b.data_mask] == 0)
    assert np.isfinite(b.y.view(np.float32)).all()


def test_dmrs_symbols_follow_the_additional_position():
    one = _simulate("channel=TDL-C,dmrs=0", 8, seed=0)
    two = _simulate("channel=TDL-C,dmrs=1", 8, seed=0)
    pilot_symbols = lambda b: sorted(set(np.nonzero(np.abs(b.pilots[0]) > 0)[0]))  # noqa: E731
    assert pilot_symbols(one) == [2]
    assert pilot_symbols(two) == [2, 11]


def test_same_seed_same_slots_other_seed_other_slots():
    a = _simulate("train", 16, seed=7)
    b = _simulate("train", 16, seed=7)
    c = _simulate("train", 16, seed=8)
    for name in ("y", "bits", "snr_db", "ls_lmmse_errors", "genie_errors"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.y, c.y)


def test_genie_beats_ls_lmmse_at_high_snr():
    b = _simulate("channel=TDL-C,delay_spread=300,speed=30:60,snr=25:30,dmrs=0,mod=16qam", 32, seed=1)
    ls, genie = b.ls_lmmse_errors.sum(), b.genie_errors.sum()
    assert genie < ls / 5, (ls, genie)


def test_received_power_matches_snr():
    b = _simulate("channel=TDL-B,snr=0,dmrs=1", 32, seed=2)
    # unit-energy symbols through a unit-energy channel plus noise of variance 1 (0 dB)
    assert np.mean(np.abs(b.y) ** 2) == pytest.approx(2.0, rel=0.15)


def test_written_file_has_per_slot_scenario_draws(train_mix_file):
    slots, attrs = read_slots(train_mix_file)
    assert len(slots) == 64
    assert attrs["scenario"] == parse_scenario("train").spec()
    assert set(slots.channel) <= set(parse_scenario("train").channels)
    assert np.all((slots.snr_db >= 0) & (slots.snr_db <= 25))
    assert np.all((slots.speed_mps >= 0) & (slots.speed_mps <= 30))
    assert set(slots.dmrs_additional_position) <= {0, 1}
    subset, _ = read_slots(train_mix_file, np.array([1, 5]))
    np.testing.assert_array_equal(subset.y, slots.y[[1, 5]])
