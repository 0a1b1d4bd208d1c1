import numpy as np
import pytest
import torch
from sionna.phy.mimo import StreamManagement
from sionna.phy.ofdm import LMMSEEqualizer

from schema.dataset import read_slots
from service.receiver.classical import PilotLayoutError, ls_channel_estimate, mrc_equalize, pusch_resource_grid
from service.receiver.features import (
    LLR_CLIP,
    featurize,
    llr_channels,
    num_feature_channels,
    num_input_channels,
    prepare,
)


def _slots(path):
    slots, _ = read_slots(path)
    return slots


def _noise(slots):
    return torch.from_numpy(10.0 ** (-slots.snr_db / 10))


def _dmrs_pilots(subcarriers: int, additional_position: int) -> torch.Tensor:
    """[14, F] complex: the DMRS values of Sionna's PUSCH pilot pattern, 0 elsewhere."""
    pattern = pusch_resource_grid(subcarriers, additional_position).pilot_pattern
    pilots = torch.zeros(14, subcarriers, dtype=torch.complex64)
    pilots[pattern.mask[0, 0].bool()] = pattern.pilots[0, 0].to(torch.complex64)
    return pilots


def test_channel_layout_and_pilot_placement(train_mix_file):
    slots = _slots(train_mix_file)
    rx = slots.y.shape[1]
    x = prepare(slots).features  # [B, 8A+21, F, S]
    assert x.shape == (len(slots), num_feature_channels(rx), slots.y.shape[3], 14)
    assert num_input_channels(rx, "robust") == num_feature_channels(rx) == 8 * rx + 21
    assert num_input_channels(rx, "grid") == 4 * rx + 2
    pilot_re = torch.from_numpy(np.abs(slots.pilots) > 0).transpose(1, 2)  # [B, F, S]
    pilot_channels = x[:, 2 * rx:2 * rx + 2]
    ls_channels = x[:, 2 * rx + 2:4 * rx + 2]
    assert torch.all(pilot_channels.abs().sum(1)[pilot_re] > 0)
    assert torch.all(pilot_channels.abs().sum(1)[~pilot_re] == 0)
    assert torch.all(ls_channels.abs().sum(1)[~pilot_re] == 0), "raw LS is zero off the pilots"
    interpolated = x[:, 4 * rx + 2:6 * rx + 2]
    assert torch.all(interpolated.abs().sum(1) > 0), "the interpolated LS estimate covers every RE"
    # pilots are exactly the slot's DMRS values
    np.testing.assert_allclose(pilot_channels[:, 0].numpy(), slots.pilots.real.transpose(0, 2, 1))


def test_raw_ls_is_y_times_conj_pilot_for_unit_pilots():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 2, 14, 12, dtype=torch.complex64, generator=g)
    phases = torch.rand(14, 12, generator=g) * 2 * torch.pi
    pilots = torch.zeros(2, 14, 12, dtype=torch.complex64)
    pilots[:, 2, ::2] = torch.polar(torch.ones(6), phases[2, ::2])  # unit-modulus DMRS on symbol 2
    x = featurize(y, pilots, torch.full((2,), 0.1), torch.full((2,), 4))
    rms = y.abs().square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
    expected = (y / rms) * pilots[:, None].conj()
    ls = torch.complex(x[:, 6:8], x[:, 8:10]).transpose(2, 3)  # back to [B, A, S, F]
    torch.testing.assert_close(ls[:, :, 2, ::2], expected[:, :, 2, ::2])


def test_raw_ls_divides_by_pilot_power_for_boosted_dmrs(train_mix_file):
    slots = _slots(train_mix_file)
    rx = slots.y.shape[1]
    x = prepare(slots).features
    y = torch.from_numpy(slots.y)
    y = y / y.abs().square().mean(dim=(1, 2, 3), keepdim=True).sqrt()
    p = torch.from_numpy(slots.pilots)[:, None]
    on = p.abs() > 0
    expected = torch.where(on, y * p.conj() / p.abs().square().clamp_min(1e-9), 0).transpose(2, 3)
    got = torch.complex(x[:, 2 * rx + 2:3 * rx + 2], x[:, 3 * rx + 2:4 * rx + 2])
    torch.testing.assert_close(got, expected)
    assert np.allclose(np.abs(slots.pilots[np.abs(slots.pilots) > 0]) ** 2, 2.0), "Sionna boosts DMRS by 3 dB"


@pytest.mark.parametrize("known_noise", [True, False])
def test_features_do_not_depend_on_receiver_gain(train_mix_file, known_noise):
    slots = _slots(train_mix_file)
    y = torch.from_numpy(slots.y)
    p = torch.from_numpy(slots.pilots)
    no = _noise(slots) if known_noise else torch.zeros(len(slots))
    k = torch.from_numpy(slots.bits_per_symbol.astype(np.int64))
    torch.testing.assert_close(featurize(3.7 * y, p, 3.7 ** 2 * no, k), featurize(y, p, no, k), rtol=1e-4, atol=2e-3)


def test_classical_symbols_reproduce_the_ls_lmmse_baseline_bit_for_bit(train_mix_file):
    """The featurizer's symbol estimate, demapped, makes exactly the stored LS-LMMSE decisions."""
    from sionna.phy.mapping import Demapper

    slots = _slots(train_mix_file)
    rx = slots.y.shape[1]
    x = prepare(slots).features
    symbols = torch.complex(x[:, 4 * rx + 2 + 2 * rx], x[:, 4 * rx + 3 + 2 * rx]).transpose(1, 2)  # [B, S, F]
    for row in range(len(slots)):
        k = int(slots.bits_per_symbol[row])
        data = torch.from_numpy(slots.data_mask[row])
        decided = Demapper("maxlog", "qam", k, hard_out=True)(symbols[row][data][None], torch.tensor(0.1))
        coded = slots.bits[row][slots.data_mask[row]][:, :k].reshape(-1)
        assert int((decided.numpy().reshape(-1) != coded).sum()) == slots.ls_lmmse_errors[row]


def test_closed_form_equalizer_equals_sionnas_lmmse_block(train_mix_file):
    slots = _slots(train_mix_file)
    rows = np.flatnonzero(slots.dmrs_additional_position == slots.dmrs_additional_position[0])
    y, p, no = (torch.from_numpy(slots.y[rows]), torch.from_numpy(slots.pilots[rows]),
                _noise(slots)[rows].float())
    h, err_var = ls_channel_estimate(y, p, no)
    x, no_eff = mrc_equalize(y, h, err_var, no)
    grid = pusch_resource_grid(p.shape[-1], int(slots.dmrs_additional_position[0]))
    equalizer = LMMSEEqualizer(grid, StreamManagement(np.ones([1, 1], int), 1))
    h7 = h[:, None, :, None, None]
    ref_x, ref_no = equalizer(y[:, None], h7, err_var[:, None, :, None, None].expand_as(h7).real, no[:, None, None])
    data = torch.from_numpy(slots.data_mask[rows[0]])
    torch.testing.assert_close(x[:, data], ref_x[:, 0, 0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(no_eff[:, data], ref_no[:, 0, 0], rtol=2e-3, atol=1e-5)


def test_pilots_of_another_dmrs_sequence_give_the_same_estimate(train_mix_file):
    """A slot whose DMRS values differ (another scrambling) is estimated with its own pilots."""
    slots = _slots(train_mix_file)
    y, p = torch.from_numpy(slots.y[:4]), torch.from_numpy(slots.pilots[:4])
    rows = [r for r in range(4) if slots.dmrs_additional_position[r] == slots.dmrs_additional_position[0]]
    y, p, no = y[rows], p[rows], _noise(slots)[rows].float()
    rotation = torch.polar(torch.ones(p.shape), torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) * 6.3)
    other = torch.where(p != 0, p * rotation, p)
    y_other = torch.where((p != 0)[:, None], y * rotation[:, None], y)  # same channel, other pilot values
    torch.testing.assert_close(ls_channel_estimate(y_other, other, no)[0], ls_channel_estimate(y, p, no)[0],
                               rtol=1e-4, atol=1e-5)


def test_unknown_noise_is_estimated_from_the_pilots(high_snr_file):
    slots = _slots(high_snr_file)
    y, p = torch.from_numpy(slots.y), torch.from_numpy(slots.pilots)
    k = torch.from_numpy(slots.bits_per_symbol.astype(np.int64))
    log_no = 6 * y.shape[1] + 5  # the last classical channel
    known = featurize(y, p, _noise(slots), k)[:, log_no, 0, 0]
    estimated = featurize(y, p, torch.zeros(len(slots)), k)[:, log_no, 0, 0]
    assert (estimated - known).abs().median() < 0.3, "log10 noise within a factor 2 on a smooth channel"


def test_pilots_off_a_dmrs_layout_are_refused():
    y = torch.randn(1, 2, 14, 12, dtype=torch.complex64)
    pilots = torch.zeros(1, 14, 12, dtype=torch.complex64)
    pilots[:, 5, ::2] = 1
    with pytest.raises(PilotLayoutError, match="not a PUSCH DMRS layout"):
        featurize(y, pilots, torch.ones(1), torch.full((1,), 4))
    pilots = torch.zeros(1, 14, 12, dtype=torch.complex64)
    pilots[:, 2, 1::2] = 1  # right symbol, wrong comb
    with pytest.raises(PilotLayoutError, match="differ"):
        featurize(y, pilots, torch.ones(1), torch.full((1,), 4))


def test_labels_and_valid_mask_follow_the_modulation(train_mix_file):
    slots = _slots(train_mix_file)
    t = prepare(slots)
    assert t.valid.sum(dim=(1, 2, 3)).tolist() == slots.num_bits.tolist()
    assert torch.all(t.labels[~t.valid] == 0)


@pytest.mark.parametrize("estimate", ["ls", "robust"])
def test_llr_channels_are_sionnas_maxlog_llrs_of_the_lmmse_estimate(train_mix_file, estimate):
    from sionna.phy.mapping import Demapper

    slots = _slots(train_mix_file)
    rx = slots.y.shape[1]
    x = prepare(slots).features
    first = {"ls": 6 * rx + 2, "robust": 8 * rx + 12}[estimate]  # each estimate's x, then its no_eff
    symbols = torch.complex(x[:, first], x[:, first + 1]).transpose(1, 2)  # [B, S, F]
    no_eff = (10 ** x[:, first + 2]).transpose(1, 2)
    llrs = x[:, llr_channels(rx, estimate)].transpose(2, 3)  # [B, 6, S, F]
    for row in range(0, len(slots), 7):
        k = int(slots.bits_per_symbol[row])
        data = torch.from_numpy(slots.data_mask[row])
        expected = Demapper("maxlog", "qam", k)(symbols[row][data][None], no_eff[row][data][None]).reshape(-1, k)
        got = llrs[row, :k].permute(1, 2, 0)[data]
        inside = (symbols[row][data].real.abs() < 4) & (symbols[row][data].imag.abs() < 4)  # the feature clips x
        torch.testing.assert_close(got[inside], expected.clamp(-LLR_CLIP, LLR_CLIP)[inside], rtol=2e-3, atol=2e-3)
        assert torch.all(llrs[row, k:] == 0)


@pytest.mark.parametrize("additional_position", [0, 1])
def test_the_ls_operator_equals_sionnas_estimator_block(additional_position):
    """The sparse operator read off Sionna's PUSCHLSChannelEstimator gives the block's own output."""
    from service.receiver.classical import sionna_ls_estimator

    g = torch.Generator().manual_seed(additional_position)
    y = torch.complex(torch.randn(3, 2, 14, 48, generator=g), torch.randn(3, 2, 14, 48, generator=g))
    no = torch.rand(3, generator=g) + 0.05
    pilots = _dmrs_pilots(48, additional_position)
    h, err_var = ls_channel_estimate(y, pilots.expand(3, -1, -1), no)
    h_ref, err_ref = sionna_ls_estimator(48, additional_position)(y[:, None], no[:, None, None])
    torch.testing.assert_close(h, h_ref[:, 0, :, 0, 0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(err_var, err_ref[:, 0, :, 0, 0].float(), rtol=1e-4, atol=1e-6)


def test_the_robust_estimate_makes_fewer_errors_than_ls_on_two_dmrs_slots(tmp_path):
    """Where LS-LMMSE is at its best (two DMRS symbols, 19..25 dB), equalising with the robust estimate
    still makes clearly fewer bit errors: it averages the pilots' noise where LS interpolates it."""
    from tests.conftest import simulate

    path = simulate(tmp_path / "two-dmrs.h5", "channel=TDL-A|TDL-C,delay_spread=30:300,speed=0:30,snr=19:25,"
                    "dmrs=1,mod=16qam", 384, seed=7)
    slots = _slots(path)
    rx = slots.y.shape[1]
    t = prepare(slots)

    def errors(estimate: str) -> int:
        return int((((t.features[:, llr_channels(rx, estimate)] > 0).float() != t.labels) & t.valid).sum())

    ls, robust = errors("ls"), errors("robust")
    assert ls == int(slots.ls_lmmse_errors.sum()) > 50
    assert robust < 0.6 * ls, (robust, ls)  # 34 vs 110 with the prior chosen per slot (37 with 3 us alone)


def test_the_robust_estimate_picks_its_prior_by_the_channels_length():
    """A channel flat in frequency is estimated with a short prior, which averages out more noise; a
    channel with taps 2.5 us apart keeps the widest. One fixed prior gives both the same error (0.015
    and 0.013 here with the 3 us prior alone); each reported error variance stays calibrated."""
    from service.receiver.classical import SUBCARRIER_SPACING_HZ, Pair, PilotLayout, robust_lmmse_channel_estimate

    g = torch.Generator().manual_seed(0)
    batch, antennas, symbols, subcarriers = 64, 2, 14, 48
    pilots = _dmrs_pilots(subcarriers, 1)
    pilots, on = pilots.expand(batch, -1, -1), (pilots != 0).expand(batch, -1, -1)
    no = torch.full((batch,), 0.1)

    def gaussian(*shape):
        return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)) / 2 ** 0.5

    def error(delays_s: list[float]) -> tuple[float, float]:
        taps = gaussian(batch, antennas, len(delays_s)) * ((1 - no[:, None, None]) / len(delays_s)) ** 0.5
        per_subcarrier = torch.exp(-2j * torch.pi * torch.arange(subcarriers)[:, None] * SUBCARRIER_SPACING_HZ
                                   * torch.tensor(delays_s)[None])  # [F, taps]
        h = (taps[:, :, None] * per_subcarrier).sum(-1)[:, :, None].expand(-1, -1, symbols, -1)  # [B, A, S, F]
        noise = gaussian(*h.shape) * (no[:, None, None, None] / pilots.abs().square().clamp_min(1e-12)[:, None]) ** 0.5
        raw_ls = torch.where(on[:, None], h + noise, 0)
        estimate, err_var = robust_lmmse_channel_estimate(Pair.of(raw_ls), Pair.of(pilots), no,
                                                          PilotLayout.of(on).robust_prior)
        return (estimate.complex() - h).abs().square().mean().item(), err_var.mean().item()

    flat, long = error([0.0]), error([0.0, 2.5e-6])
    assert flat[0] < 0.5 * long[0], (flat, long)  # 0.0046 vs 0.013 when written
    for mse, reported in (flat, long):
        assert reported / 1.5 < mse < 1.5 * reported, (mse, reported)
