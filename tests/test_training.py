import json

import pytest
import torch

from schema.dataset import read_slots
from service.cli import main as service_main
from service.receiver.features import prepare
from service.receiver.model import DeepRx, config_for
from service.receiver.train import TrainConfig, train, validate


def test_tiny_model_loss_falls_on_a_tiny_dataset(high_snr_file, tmp_path):
    config = TrainConfig(size="tiny", steps=150, batch_size=16, learning_rate=1e-2, warmup_steps=10,
                         validation_slots=16, checkpoint_every=150, seed=0)
    slots, _ = read_slots(high_snr_file)
    torch.manual_seed(config.seed)
    untrained = validate(DeepRx(config_for("tiny")), prepare(slots))
    metadata = train(high_snr_file, tmp_path / "tiny", config, progress=False)
    trained = metadata["history"][-1]
    assert untrained["loss_bits"] > 0.95, "an untrained receiver knows about nothing"
    assert trained["val_loss_bits"] < 0.85 * untrained["loss_bits"], metadata["history"]
    assert trained["val_ber"] < 0.6 * untrained["ber"]


def test_train_resume_and_eval_cli_round_trip(high_snr_file, tmp_path, capsys):
    out = tmp_path / "model"
    common = ["train", "--data", str(high_snr_file), "--out", str(out), "--size", "tiny", "--batch-size", "8",
              "--checkpoint-every", "5", "--validation-slots", "8", "--quiet"]
    assert service_main(common + ["--steps", "5"]) == 0
    assert json.loads((out / "model.json").read_text())["steps"] == 5
    assert service_main(common + ["--steps", "10"]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["steps"] == 10 and [h["step"] for h in meta["history"]] == [5, 10]
    capsys.readouterr()

    plot = tmp_path / "ber.png"
    assert service_main(["eval", "--model", str(out), "--data", str(high_snr_file), "--json",
                         "--plot", str(plot)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["slots"] == 96
    assert set(report["ber"]) == {"deeprx", "ls_lmmse", "genie"}
    assert report["per_snr"] and sum(row["slots"] for row in report["per_snr"]) == 96
    assert plot.stat().st_size > 1000

    # the printed BER is the model's own: recompute it through the library
    from service.receiver.checkpoint import load_checkpoint
    slots, _ = read_slots(high_snr_file)
    expected = validate(load_checkpoint(out).model, prepare(slots))["ber"]
    assert abs(report["ber"]["deeprx"] - expected) < 1e-12

    # the server's ONNX Runtime backend gives the same hard decisions (LLRs within 1e-4: a bit whose
    # LLR is that close to 0 may flip)
    assert service_main(["eval", "--model", str(out), "--data", str(high_snr_file), "--json",
                         "--backend", "onnxruntime"]) == 0
    served = json.loads(capsys.readouterr().out)
    assert abs(served["ber"]["deeprx"] - report["ber"]["deeprx"]) * int(slots.num_bits.sum()) <= 3
    assert served["ber"]["ls_lmmse"] == report["ber"]["ls_lmmse"]

    # several files are evaluated as one: the same file twice doubles every count, not the BER
    assert service_main(["eval", "--model", str(out), "--data", str(high_snr_file), str(high_snr_file),
                         "--json", "--backend", "onnxruntime"]) == 0
    twice = json.loads(capsys.readouterr().out)
    assert twice["slots"] == 2 * 96 and twice["ber"] == served["ber"]
    assert [row["slots"] for row in twice["per_snr"]] == [2 * row["slots"] for row in served["per_snr"]]

    assert service_main(["eval", "--model", str(out), "--data", str(high_snr_file)]) == 0
    table = capsys.readouterr().out
    assert "deeprx" in table and "ls_lmmse" in table and "genie" in table


def test_resuming_as_another_size_is_refused(high_snr_file, tmp_path, capsys):
    args = ["--data", str(high_snr_file), "--out", str(tmp_path / "m"), "--steps", "2", "--batch-size", "8",
            "--checkpoint-every", "2", "--validation-slots", "8", "--quiet"]
    assert service_main(["train", "--size", "tiny", *args]) == 0
    assert service_main(["train", "--size", "small", *args]) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_eval_of_a_missing_model_is_a_clear_error(high_snr_file, tmp_path, capsys):
    assert service_main(["eval", "--model", str(tmp_path / "nope"), "--data", str(high_snr_file)]) == 2
    assert "not a model checkpoint" in capsys.readouterr().err


def test_train_concatenates_several_datasets_and_records_them(high_snr_file, train_mix_file, tmp_path):
    out = tmp_path / "m"
    assert service_main(["train", "--data", str(high_snr_file), str(train_mix_file), "--out", str(out),
                         "--size", "tiny", "--steps", "2", "--batch-size", "8", "--checkpoint-every", "2",
                         "--validation-slots", "8", "--precision", "bfloat16", "--device", "cpu", "--quiet"]) == 0
    meta = json.loads((out / "model.json").read_text())
    sizes = [len(read_slots(path)[0]) for path in (high_snr_file, train_mix_file)]
    attrs = [read_slots(path)[1] for path in (high_snr_file, train_mix_file)]
    assert meta["data"]["paths"] == [str(high_snr_file), str(train_mix_file)]
    assert meta["data"]["slots"] == sum(sizes) and meta["data"]["seeds"] == [int(a["seed"]) for a in attrs]
    assert meta["data"]["scenarios"] == [str(a["scenario"]) for a in attrs]  # each file's own
    assert meta["device"] == "cpu" and meta["train"]["precision"] == "bfloat16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_training_on_a_missing_gpu_is_a_clear_error(high_snr_file, tmp_path, capsys):
    assert service_main(["train", "--data", str(high_snr_file), "--out", str(tmp_path / "m"), "--size", "tiny",
                         "--steps", "1", "--device", "cuda", "--quiet"]) == 2
    assert "sees no CUDA GPU" in capsys.readouterr().err


def test_a_weighted_fine_tune_starts_from_a_classical_model_and_refuses_another_architecture(
        high_snr_file, tmp_path, capsys):
    common = ["--data", str(high_snr_file), "--size", "tiny", "--batch-size", "8", "--checkpoint-every", "4",
              "--validation-slots", "8", "--quiet"]
    classical = tmp_path / "classical"
    assert service_main(["train", *common, "--inputs", "classical", "--steps", "4", "--out", str(classical)]) == 0

    from service.receiver.checkpoint import load_checkpoint
    from service.receiver.train import initialize_from
    source = load_checkpoint(classical).model
    weighted = DeepRx(config_for("tiny", inputs="weighted")).eval()
    initialize_from(weighted, classical)  # the LLR weight starts at 0: the classical model's logits exactly
    data = prepare(read_slots(high_snr_file, slice(0, 4))[0])
    torch.testing.assert_close(weighted(data.features, data.bits_per_symbol),
                               source(data.features, data.bits_per_symbol), rtol=0, atol=0)

    out = tmp_path / "weighted"
    assert service_main(["train", *common, "--inputs", "weighted", "--init", str(classical), "--steps", "8",
                         "--learning-rate", "1e-2", "--out", str(out)]) == 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["train"]["init"] == str(classical) and meta["config"]["inputs"] == "weighted"
    assert meta["fresh_parameters"] == ["prior_weight.weight", "prior_weight.bias"]
    tuned = load_checkpoint(out).model
    assert float(tuned.prior_weight.weight.detach().abs().sum() + tuned.prior_weight.bias.detach().abs()) > 0, \
        "the LLR weight learnt"
    # a resumed fine-tune keeps its fresh parameters' own learning rate (and the optimizer state's layout)
    assert service_main(["train", *common, "--inputs", "weighted", "--init", str(classical), "--steps", "12",
                         "--learning-rate", "1e-2", "--out", str(out)]) == 0
    resumed = json.loads((out / "model.json").read_text())
    assert resumed["steps"] == 12 and resumed["fresh_parameters"] == meta["fresh_parameters"]

    # grid inputs read fewer channels: their input convolution has another shape
    assert service_main(["train", *common, "--inputs", "grid", "--init", str(classical), "--steps", "4",
                         "--out", str(tmp_path / "grid")]) == 2
    assert "another architecture" in capsys.readouterr().err


def test_the_log_objective_weighs_each_slot_by_its_inverse_loss():
    from service.receiver.loss import training_objective
    per_slot = torch.tensor([0.5, 1e-4], requires_grad=True)  # a slot at 0 dB, one at 25 dB
    training_objective(per_slot).backward()
    torch.testing.assert_close(per_slot.grad, torch.tensor([0.5, 0.5]))  # the mean: both count the same
    per_slot.grad = None
    training_objective(per_slot, floor_bits=1e-3).backward()
    torch.testing.assert_close(per_slot.grad, 0.5 / (per_slot.detach() + 1e-3))
    assert per_slot.grad[1] > 400 * per_slot.grad[0], "the high-SNR slot now steers the step"


def test_training_with_the_log_objective_records_it_and_reports_bits(high_snr_file, tmp_path):
    config = TrainConfig(size="tiny", steps=40, batch_size=16, learning_rate=1e-2, warmup_steps=5,
                         validation_slots=16, checkpoint_every=40, seed=0, loss_floor_bits=1e-2)
    metadata = train(high_snr_file, tmp_path / "log", config, progress=False)
    assert metadata["train"]["loss_floor_bits"] == 1e-2
    last = metadata["history"][-1]
    assert 0 < last["train_loss_bits"] < 1.5, "reported in bits (a log objective would be negative here)"
    assert last["val_loss_bits"] < 1.0


def test_a_robust_fine_tune_starts_exactly_at_the_weighted_model_it_extends(high_snr_file, tmp_path):
    common = ["--data", str(high_snr_file), "--size", "tiny", "--batch-size", "8", "--checkpoint-every", "4",
              "--validation-slots", "8", "--quiet"]
    weighted = tmp_path / "weighted"
    assert service_main(["train", *common, "--inputs", "weighted", "--steps", "4", "--out", str(weighted)]) == 0

    from service.receiver.checkpoint import load_checkpoint
    from service.receiver.train import initialize_from
    robust = DeepRx(config_for("tiny", inputs="robust")).eval()
    assert initialize_from(robust, weighted) == ["robust_conv.weight", "robust_weight.weight", "robust_weight.bias"]
    data = prepare(read_slots(high_snr_file, slice(0, 4))[0])
    torch.testing.assert_close(robust(data.features, data.bits_per_symbol),
                               load_checkpoint(weighted).model(data.features, data.bits_per_symbol), rtol=0, atol=0)

    out = tmp_path / "robust"
    assert service_main(["train", *common, "--inputs", "robust", "--init", str(weighted), "--steps", "8",
                         "--learning-rate", "1e-2", "--out", str(out)]) == 0
    tuned = load_checkpoint(out).model
    assert tuned.config.inputs == "robust"
    assert float(tuned.robust_conv.weight.detach().abs().sum()) > 0, "the robust estimate's channels are read"
    assert float(tuned.robust_weight.weight.detach().abs().sum()) > 0, "and its LLRs weighed"
