import json

import pytest

from service.cli import main as service_main


def test_experiment_cli_reports_every_method_seed_and_target(trained_tiny_checkpoint, train_mix_file, high_snr_file, capsys,
                                                             tmp_path):
    plot, rows = tmp_path / "gap.png", tmp_path / "rows.jsonl"
    code = service_main(["experiment", "--model", str(trained_tiny_checkpoint), "--pool", str(train_mix_file),
                         "--targets", str(high_snr_file), "channel=TDL-D,speed=100:150,dmrs=0,snr=15:25",
                         "--target-slots", "40", "--adaptation-slots", "16", "--seeds", "2",
                         "--methods", "none,random,first-order:identity:raw,target-only", "--k", "16", "--steps", "10",
                         "--learning-rate", "3e-3", "--multi-target", "--held-out-slots", "12", "--fit-slots", "32",
                         "--rows", str(rows), "--rehearsal", str(train_mix_file), "--json", "--plot", str(plot)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    keys = {"target", "method", "seed", "ber_before", "ber_after", "ber_genie", "gap_closure",
            "non_target_ber_change", "seconds"}
    assert all(keys <= set(row) for row in out["results"])
    # 2 seeds x 4 methods x (2 single targets + 2 rows of the multi-target run)
    assert len(out["results"]) == 2 * 4 * 4
    none = [r for r in out["results"] if r["method"] == "none"]
    assert all(r["ber_after"] == r["ber_before"] and r["gap_closure"] == 0 and r["non_target_ber_change"] == 0
               for r in none)
    assert {r["target"] for r in out["results"]} >= {"high-snr", "multi:high-snr"}
    assert plot.stat().st_size > 1000
    assert [json.loads(line) for line in rows.read_text().splitlines()] == out["results"]  # written as made
    summary = {(s["target"], s["method"]) for s in out["summary"]}
    assert ("high-snr", "target-only") in summary

    # resumed with one more seed: the summary covers the rows already in the file too
    assert service_main(["experiment", "--model", str(trained_tiny_checkpoint), "--pool", str(train_mix_file),
                         "--targets", str(high_snr_file), "--target-slots", "40", "--adaptation-slots", "16",
                         "--held-out-slots", "12", "--methods", "none", "--first-seed", "2", "--seeds", "1",
                         "--rows", str(rows), "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert [r["seed"] for r in resumed["results"]] == [2]
    none = next(s for s in resumed["summary"] if s["target"] == "high-snr" and s["method"] == "none")
    assert none["seeds"] == 3


def test_the_specialist_trains_on_every_slot_not_held_out_and_is_the_yardstick(trained_tiny_checkpoint, train_mix_file,
                                                                               high_snr_file, capsys):
    assert service_main(["experiment", "--model", str(trained_tiny_checkpoint), "--pool", str(train_mix_file),
                         "--targets", str(high_snr_file), "--adaptation-slots", "8", "--held-out-slots", "12",
                         "--specialist-slots", "20", "--specialist-steps", "400", "--seeds", "1",
                         "--methods", "none,target-only,target+first-order:identity:raw,specialist", "--k", "8",
                         "--steps", "10", "--learning-rate", "3e-3", "--fit-slots", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    specialist = next(r for r in out["results"] if r["method"] == "specialist")
    assert specialist["adaptation_slots"] == 16  # 20 slots, the last fifth validates
    assert specialist["gradient_evaluations"] > 0 and 0 < specialist["specialist_best_step"] <= 400
    rows = {r["method"]: r for r in out["summary"]}
    gain = specialist["ber_before"] - specialist["ber_after"]
    for method, row in rows.items():  # every gain is read against the specialist's
        expected = (row["ber_before"] - row["ber_after"]) / gain if gain > 0 else None
        assert expected is None or row["of_specialist"] == pytest.approx(expected)
