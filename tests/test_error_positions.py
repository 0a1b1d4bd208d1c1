"""benchmarks/error_positions.py: per-symbol error counts that add up to what the simulator counted."""
import numpy as np

from benchmarks.error_positions import error_positions
from schema.dataset import read_slots


def test_counts_add_up_to_the_simulators_ls_lmmse_errors(tiny_checkpoint, train_mix_file):
    slots, _ = read_slots(train_mix_file)
    totals = error_positions(tiny_checkpoint, train_mix_file, batch=16)
    assert totals["ls_lmmse_by_symbol"].sum() == slots.ls_lmmse_errors.sum()
    assert totals["ls_lmmse_by_subcarrier"].sum() == slots.ls_lmmse_errors.sum()
    assert totals["deeprx_by_symbol"].sum() == totals["deeprx_by_subcarrier"].sum() > 0
    assert totals["bits_by_symbol"].sum() == slots.num_bits.sum()
    pilot_only = np.flatnonzero(totals["bits_by_symbol"] == 0)
    assert len(pilot_only) >= 1 and totals["deeprx_by_symbol"][pilot_only].sum() == 0
