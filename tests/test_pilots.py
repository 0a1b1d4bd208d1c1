"""The pilot-based DMRS residual SINR on simulated slots: reads as the SNR on a smooth channel, and
falls where the channel outruns the pilot spacing (long delay spread, fast UEs with two DMRS symbols)."""
import numpy as np
import pytest

from schema.dataset import read_slots
from service.monitoring.pilots import pilot_sinr_db
from tests.conftest import simulate


def _median_sinr(tmp_path, spec: str, seed: int) -> float:
    slots, _ = read_slots(simulate(tmp_path / f"{seed}.h5", spec, 12, seed=seed))
    return float(np.median([pilot_sinr_db(slots.y[i], slots.pilots[i]) for i in range(len(slots))]))


@pytest.mark.parametrize("snr", [5, 20])
def test_on_a_smooth_channel_it_reads_as_the_snr(tmp_path, snr):
    sinr = _median_sinr(tmp_path, f"channel=TDL-A,delay_spread=30,speed=0,snr={snr},dmrs=1", seed=snr)
    assert sinr == pytest.approx(snr, abs=2.0)


def test_long_delay_spread_and_high_speed_lower_it_at_the_same_snr(tmp_path):
    smooth = _median_sinr(tmp_path, "channel=TDL-A,delay_spread=30,speed=0,snr=25,dmrs=1", seed=1)
    long_delay = _median_sinr(tmp_path, "channel=TDL-A,delay_spread=1200,speed=0,snr=25,dmrs=1", seed=2)
    fast = _median_sinr(tmp_path, "channel=TDL-A,delay_spread=30,speed=150,snr=25,dmrs=1", seed=3)
    assert long_delay < smooth - 3 and fast < smooth - 3


def test_a_batch_of_slots_reads_as_each_slot_alone(train_mix_file):
    slots, _ = read_slots(train_mix_file)
    layout = (slots.pilots[0] != 0).tobytes()
    rows = [i for i in range(len(slots.y)) if (slots.pilots[i] != 0).tobytes() == layout]
    assert len(rows) > 1
    batch = pilot_sinr_db(slots.y[rows], slots.pilots[rows])
    assert batch.shape == (len(rows),)
    assert np.allclose(batch, [pilot_sinr_db(slots.y[i], slots.pilots[i]) for i in rows], rtol=0, atol=1e-9)
