import json

import pytest

from schema.dataset import read_slots
from service.cli import main as service_main


@pytest.mark.parametrize("method, score", [("identity", "raw"), ("diagonal", "theta-relative"),
                                           ("ekfac", "l-relative"), ("kfac", "cosine"), ("arnoldi", "raw")])
def test_influence_cli_ranks_the_pool(train_mix_file, high_snr_file, tiny_checkpoint, capsys, method, score):
    code = service_main(["influence", "--model", str(tiny_checkpoint), "--pool", str(train_mix_file),
                         "--targets", str(high_snr_file), "--method", method, "--score", score, "--top", "5",
                         "--fit-slots", "16", "--rank", "8", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    pool, _ = read_slots(train_mix_file)
    assert len(out["top"]) == 5
    scores = [row["score"] for row in out["top"]]
    assert scores == sorted(scores), "most beneficial (lowest) first"
    for row in out["top"]:
        assert row["channel"] == pool.channel[row["index"]]
        assert row["snr_db"] == pytest.approx(float(pool.snr_db[row["index"]]))
    assert {"pool_gradients", "fit_curvature", "scores", "total"} <= set(out["timings"])


def test_influence_table_names_scenario_columns(train_mix_file, high_snr_file, tiny_checkpoint, capsys):
    assert service_main(["influence", "--model", str(tiny_checkpoint), "--pool", str(train_mix_file),
                         "--targets", str(high_snr_file), "--method", "identity", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "channel" in out and "speed" in out and "negative = beneficial" in out


def test_influence_index_cli_builds_then_extends(train_mix_file, high_snr_file, tiny_checkpoint, tmp_path, capsys):
    from service.influence.index import GradientIndex
    from service.receiver.checkpoint import load_checkpoint

    index_dir = tmp_path / "index"
    args = ["influence", "index", "--model", str(tiny_checkpoint), "--index", str(index_dir), "--method", "kfac",
            "--compress", "sjlt:256", "--fit-slots", "8", "--version", "v7"]
    assert service_main([*args, "--pool", str(train_mix_file)]) == 0
    assert "built index of 64 pool rows" in capsys.readouterr().out
    assert service_main([*args, "--pool", str(train_mix_file)]) == 0
    assert "0 rows added" in capsys.readouterr().out
    targets, _ = read_slots(high_snr_file, slice(0, 8))
    result = GradientIndex(index_dir).query(load_checkpoint(tiny_checkpoint).model, "v7", targets, k=5)
    assert len(result.slot_ids) == 5 and all(s.startswith("row-") for s in result.slot_ids)
