import pytest

from client.cli import main as client_main
from schema.scenario import DEFAULTS, PRESETS, Range, ScenarioError, parse_scenario


def test_spec_from_the_docs_parses_with_ranges_and_units():
    s = parse_scenario("channel=TDL-E,delay_spread=300,speed=60:120,snr=5:15,dmrs=0,mod=16qam,prb=4,rx=2")
    assert s.channels == ("TDL-E",)
    assert s.delay_spread_ns == Range(300, 300) and s.delay_spread_ns.fixed
    assert s.speed_mps == Range(60, 120) and not s.speed_mps.fixed
    assert s.snr_db == Range(5, 15)
    assert s.dmrs_additional_positions == Range(0, 0)
    assert s.modulations == ("16qam",)
    assert (s.prb, s.rx, s.num_subcarriers) == (4, 2, 48)


def test_left_out_keys_take_the_small_models_defaults():
    defaults = parse_scenario(DEFAULTS)
    s = parse_scenario("channel=CDL-D")
    assert s.channels == ("CDL-D",)
    assert (s.prb, s.rx, s.scs_khz, s.modulations) == (defaults.prb, defaults.rx, defaults.scs_khz, defaults.modulations)


def test_alternatives_and_case_are_normalised():
    s = parse_scenario("channel=tdl-b|TDL-C|cdl-d,mod=QPSK|64qam")
    assert s.channels == ("TDL-B", "TDL-C", "CDL-D")
    assert s.modulations == ("qpsk", "64qam")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_parse_and_round_trip_through_their_canonical_spec(name):
    scenario = parse_scenario(name)
    assert parse_scenario(scenario.spec()) == scenario


@pytest.mark.parametrize("spec, key", [
    ("colour=red", "colour"),
    ("channel=TDL-Z", "channel"),
    ("channel=TDL-C,rx=3", "rx"),
    ("prb=2:4", "prb"),
    ("snr=15:5", "snr"),
    ("dmrs=4", "dmrs"),
    ("dmrs=0.5", "dmrs"),
    ("speed=fast", "speed"),
    ("mod=256qam", "mod"),
    ("scs=60", "scs"),
    ("fc=1:2", "fc"),
    ("delay_spread=", "delay_spread"),
    ("speed=-1", "speed"),
])
def test_bad_specs_fail_naming_the_key(spec, key):
    with pytest.raises(ScenarioError, match=f"'{key}'"):
        parse_scenario(spec)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ScenarioError, match="train"):
        parse_scenario("no-such-preset")


def test_client_cli_reports_bad_scenario_with_exit_code_2(tmp_path, capsys):
    code = client_main(["simulate", "--scenario", "rx=3", "--slots", "1", "--out", str(tmp_path / "x.h5")])
    assert code == 2
    assert "'rx'" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()
