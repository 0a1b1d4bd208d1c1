import numpy as np
import torch

from schema.dataset import read_slots
from service.receiver.features import featurize, num_input_channels, prepare


def _slots(path):
    slots, _ = read_slots(path)
    return slots


def test_channel_layout_and_pilot_placement(train_mix_file):
    slots = _slots(train_mix_file)
    rx = slots.y.shape[1]
    x = prepare(slots).features  # [B, 4A+2, F, S]
    assert x.shape == (len(slots), num_input_channels(rx), slots.y.shape[3], 14)
    pilot_re = torch.from_numpy(np.abs(slots.pilots) > 0).transpose(1, 2)  # [B, F, S]
    pilot_channels = x[:, 2 * rx:2 * rx + 2]
    ls_channels = x[:, 2 * rx + 2:]
    assert torch.all(pilot_channels.abs().sum(1)[pilot_re] > 0)
    assert torch.all(pilot_channels.abs().sum(1)[~pilot_re] == 0)
    assert torch.all(ls_channels.abs().sum(1)[~pilot_re] == 0), "raw LS is zero off the pilots"
    # pilots are exactly the slot's DMRS values
    np.testing.assert_allclose(pilot_channels[:, 0].numpy(), slots.pilots.real.transpose(0, 2, 1))


def test_raw_ls_is_y_times_conj_pilot_for_unit_pilots():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 2, 14, 12, dtype=torch.complex64, generator=g)
    phases = torch.rand(14, 12, generator=g) * 2 * torch.pi
    pilots = torch.zeros(2, 14, 12, dtype=torch.complex64)
    pilots[:, 2, ::2] = torch.polar(torch.ones(6), phases[2, ::2])  # unit-modulus DMRS on symbol 2
    x = featurize(y, pilots)
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
    got = torch.complex(x[:, 2 * rx + 2:3 * rx + 2], x[:, 3 * rx + 2:])
    torch.testing.assert_close(got, expected)
    assert np.allclose(np.abs(slots.pilots[np.abs(slots.pilots) > 0]) ** 2, 2.0), "Sionna boosts DMRS by 3 dB"


def test_features_do_not_depend_on_receiver_gain(train_mix_file):
    slots = _slots(train_mix_file)
    y = torch.from_numpy(slots.y)
    p = torch.from_numpy(slots.pilots)
    torch.testing.assert_close(featurize(3.7 * y, p), featurize(y, p), rtol=1e-5, atol=1e-5)


def test_labels_and_valid_mask_follow_the_modulation(train_mix_file):
    slots = _slots(train_mix_file)
    t = prepare(slots)
    assert t.valid.sum(dim=(1, 2, 3)).tolist() == slots.num_bits.tolist()
    assert torch.all(t.labels[~t.valid] == 0)
