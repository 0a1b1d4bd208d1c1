"""Training DeepRx on slot datasets: Adam, warmup + cosine learning rate, resumable checkpoints, CPU or CUDA."""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from schema.dataset import read_datasets
from service.receiver.checkpoint import (
    flatten_optimizer_state,
    load_checkpoint,
    restore_optimizer_state,
    save_checkpoint,
)
from service.receiver.features import SlotTensors, prepare
from service.receiver.loss import bce_bits, bit_errors, per_slot_bce_bits, training_objective
from service.receiver.model import DeepRx, config_for


@dataclass
class TrainConfig:
    """Knobs of one training run; stored in the checkpoint so a resume continues the same run."""

    size: str = "small"
    inputs: str = ""  # feature channels the model reads; empty: the size's own (features.INPUTS)
    padding: str = ""  # what the 3x3 convolutions read past the slot's edges; empty: the size's own (zeros)
    init: str = ""  # a model directory whose weights a new run starts from (a fine-tune); empty: random
    # with init: the learning rate of the weights the init lacks, relative to the rest (they start from
    # nothing while the rest is already trained, and a fine-tune's rate leaves them near their start)
    new_lr_scale: float = 10.0
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 2e-3
    final_lr_fraction: float = 0.05
    warmup_steps: int = 100
    validation_slots: int = 256
    checkpoint_every: int = 250
    seed: int = 0
    # 0: minimise the mean per-slot loss; > 0: the mean of log(per-slot loss + this), which weighs slots by
    # 1 / (their loss + this) and so lifts high-SNR slots (loss.training_objective)
    loss_floor_bits: float = 0.0
    precision: str = "float32"  # or "bfloat16": forward and loss under CUDA autocast (BatchNorm stays float32)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to ``final_lr_fraction`` of the peak at ``config.steps``."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    floor = config.final_lr_fraction
    return config.learning_rate * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def validate(model: DeepRx, data: SlotTensors, batch_size: int = 256) -> dict:
    """Loss (bits) and BER of ``model`` in eval mode on ``data``."""
    was_training = model.training
    model.eval()
    loss_sum, errors, bits = 0.0, 0, 0
    for start in range(0, len(data), batch_size):
        part = data[start:start + batch_size]
        logits = model(part.features, part.bits_per_symbol)
        loss_sum += float(bce_bits(logits, part.labels, part.valid)) * len(part)
        errors += int(bit_errors(logits, part.labels, part.valid).sum())
        bits += int(part.valid.sum())
    model.train(was_training)
    return {"loss_bits": loss_sum / max(1, len(data)), "ber": errors / max(1, bits)}


def _batch_indices(num_train: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The minibatch of ``step``: a function of (seed, step) alone, so a resumed run sees the same data."""
    per_epoch = max(1, num_train // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[position * batch_size:(position + 1) * batch_size]


def training_device(name: str = "auto") -> torch.device:
    """``auto``: the GPU when PyTorch sees one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' asked for, but PyTorch sees no CUDA GPU")
    return torch.device(name)


def initialize_from(model: DeepRx, directory: str | Path) -> list[str]:
    """Copy the weights of the model in ``directory`` into ``model`` and return the names of those it
    lacked, which keep their initial values (the LLR weight a weighted model adds to a classical one,
    say). Any other difference in architecture is an error."""
    source = load_checkpoint(directory).model.state_dict()
    try:
        missing, unexpected = model.load_state_dict(source, strict=False)
    except RuntimeError as err:  # a parameter of another shape
        raise ValueError(f"'{directory}' holds another architecture: {str(err).splitlines()[-1].strip()}") from err
    if unexpected:
        raise ValueError(f"'{directory}' has weights this model lacks: {', '.join(unexpected)}")
    if len(missing) == len(model.state_dict()):
        raise ValueError(f"'{directory}' shares no weights with this model")
    return list(missing)


def _optimizer(model: DeepRx, fresh: Sequence[str], config: TrainConfig) -> torch.optim.Adam:
    """Adam; each group's ``lr_scale`` multiplies the schedule: ``new_lr_scale`` for the ``fresh``
    parameters of a fine-tune, 1 for the rest."""
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n not in fresh], "lr_scale": 1.0},
              {"params": [p for n, p in named if n in fresh], "lr_scale": config.new_lr_scale}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=config.learning_rate)


def train(data_paths: str | Path | Sequence[str | Path], out_dir: str | Path, config: TrainConfig,
          progress: bool = True, device: str = "auto") -> dict:
    """Train (or resume, when ``out_dir`` holds a checkpoint of this run) on the slots of ``data_paths``
    (concatenated in order) and return its metadata."""
    out_dir = Path(out_dir)
    if isinstance(data_paths, (str, Path)):
        data_paths = [data_paths]
    slots, attrs = read_datasets(data_paths)
    where = training_device(device)
    tensors = prepare(slots).to(where)
    order = torch.randperm(len(tensors), generator=torch.Generator().manual_seed(config.seed))
    n_val = min(config.validation_slots, len(tensors) // 5)
    val, train_rows = tensors[order[:n_val]], order[n_val:]  # rows, not a copy: the set may be most of memory
    rx = int(slots.y.shape[1])

    torch.manual_seed(config.seed)
    model = DeepRx(config_for(config.size, rx, config.inputs or None, config.padding or None)).to(where)
    start_step, history, seconds, fresh = 0, [], 0.0, []
    previous = load_checkpoint(out_dir, with_optimizer=True) if (out_dir / "model.json").exists() else None
    if previous is not None:
        if previous.metadata.get("train", {}).get("size") != config.size:
            raise ValueError(f"'{out_dir}' holds a '{previous.metadata.get('train', {}).get('size')}' "
                             f"model; cannot resume it as '{config.size}'")
        model.load_state_dict(previous.model.state_dict())
        fresh = previous.metadata.get("fresh_parameters", [])
        start_step = int(previous.metadata["steps"])
        history = previous.metadata.get("history", [])
        seconds = float(previous.metadata.get("train_seconds", 0.0))
    elif config.init:
        fresh = initialize_from(model, config.init)
    optimizer = _optimizer(model, fresh, config)
    if previous is not None and previous.optimizer_state is not None:
        restore_optimizer_state(optimizer, previous.optimizer_state)

    def metadata(step: int, train_loss: float) -> dict:
        val_metrics = validate(model, val)
        history.append({"step": step, "train_loss_bits": train_loss, **{f"val_{k}": v for k, v in val_metrics.items()}})
        return {
            "size": config.size, "parameters": model.num_parameters(), "steps": step,
            "train": asdict(config), "train_seconds": round(seconds, 1), "fresh_parameters": fresh,
            "data": {"paths": [str(path) for path in data_paths],
                     "scenarios": [str(part_attrs.get("scenario", "")) for part_attrs in attrs],
                     "seeds": [int(part_attrs.get("seed", -1)) for part_attrs in attrs], "slots": len(tensors)},
            "device": torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu",
            "metrics": history[-1], "history": history,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    model.train()
    ema = None
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps,
               desc=f"train {config.size}", unit="step", disable=not progress)
    tick = time.perf_counter()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step) * group["lr_scale"]
        batch = tensors[train_rows[_batch_indices(len(train_rows), config.batch_size, config.seed, step)]]
        with torch.autocast(where.type, torch.bfloat16, enabled=config.precision == "bfloat16"):
            per_slot = per_slot_bce_bits(model(batch.features, batch.bits_per_symbol), batch.labels, batch.valid)
            loss = training_objective(per_slot, config.loss_floor_bits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = per_slot.mean().item()  # reported in bits whatever the objective
        ema = value if ema is None else 0.98 * ema + 0.02 * value
        bar.set_postfix(loss=f"{ema:.3f}")
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            seconds += time.perf_counter() - tick
            tick = time.perf_counter()
            meta = metadata(done, ema)
            save_checkpoint(out_dir, model, meta, flatten_optimizer_state(optimizer))
            bar.write(f"step {done}: train loss {ema:.4f} bits, val loss {meta['metrics']['val_loss_bits']:.4f} "
                      f"bits, val BER {meta['metrics']['val_ber']:.4f}")
    bar.close()
    return load_checkpoint(out_dir).metadata
