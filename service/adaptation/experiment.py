"""The comparison: adapt to a target condition with each method, measure held-out target BER before
and after, the gap closed toward genie, and what happened to non-target (training-mix) BER.

gap closure = (BER_before - BER_after) / (BER_before - BER_genie): 1 means the model now matches
perfect-CSI LMMSE on the target, 0 means no change, negative means worse.
A method is ``none`` (no update), ``random``, ``target-only``, ``first-order``, ``second-order`` or
``target+first-order``, optionally with ``:CURVATURE:SCORE`` for the influence-guided ones (e.g.
``first-order:identity:raw``), or ``specialist``: the yardstick of what the architecture can reach on
the target, fine-tuned from the served model on plentiful target slots (every slot that is not held
out, up to ``specialist_slots``) until BER on a validation part of them stops falling. Each method's
gain is also reported as a fraction of the specialist's gain on the same seed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from schema.dataset import SlotBatch
from service.adaptation.updates import GUIDED, EarlyStop, UpdateConfig, adapt, draw, fine_tune
from service.influence.curvature import default_damping
from service.influence.gradients import ParameterSpace
from service.receiver.features import prepare
from service.receiver.model import DeepRx
from service.receiver.train import validate


@dataclass
class ExperimentConfig:
    adaptation_slots: int = 64  # labelled target slots the methods may use (per target)
    held_out_slots: int | None = None  # target slots scored after adaptation (None: all the rest)
    update: UpdateConfig = field(default_factory=UpdateConfig)  # k, steps, learning rate shared by all methods
    specialist_slots: int = 4000  # target slots the specialist trains on (its last fifth, at most 256, validates)
    specialist_steps: int = 3000  # the specialist's cap; it stops earlier when validation BER stops falling
    specialist_check_every: int = 200


def method_config(name: str, base: UpdateConfig, seed: int) -> UpdateConfig | None:
    """``first-order:ekfac:l-relative`` -> UpdateConfig; ``none`` and ``specialist`` -> None."""
    if name in ("none", "specialist"):
        return None
    parts = name.split(":")
    config = replace(base, method=parts[0], seed=seed)
    if len(parts) > 1:
        config = replace(config, curvature=replace(base.curvature, method=parts[1]))
    if len(parts) > 2:
        config = replace(config, score=parts[2])
    return config


def _genie_ber(slots: SlotBatch) -> float:
    return float(slots.genie_errors.sum() / max(1, slots.num_bits.sum()))


def train_specialist(model: DeepRx, slots: SlotBatch, config: ExperimentConfig, seed: int) -> tuple[DeepRx, dict]:
    """Fine-tune ``model`` on the target's plentiful ``slots`` (target-only rule, no rehearsal) until
    BER on their last fifth (at most 256 slots) stops falling."""
    validation_size = min(256, len(slots) // 5)
    data = prepare(slots)
    stop = EarlyStop(data[len(data) - validation_size:], every=config.specialist_check_every)
    update = replace(config.update, method="target-only", steps=config.specialist_steps, replay=0.0, seed=seed)
    tuned = fine_tune(model, data[: len(data) - validation_size], update, early_stop=stop)
    return tuned, {"gradient_evaluations": stop.steps_run * update.batch_size, "specialist_best_step": stop.best_step,
                   "adaptation_slots": len(data) - validation_size}


def run(model: DeepRx, pool: SlotBatch, targets: dict[str, SlotBatch], regression: SlotBatch,
        methods: list[str], seeds: list[int], config: ExperimentConfig, multi_target: bool = False,
        progress=None, rehearsal: SlotBatch | None = None) -> list[dict]:
    """Every method x seed on each target alone, and (``multi_target``) once on all targets together
    (the adaptation slots of every target pooled, each target's held-out slots scored apart, rows
    named ``multi:<target>``). The adaptation/held-out split changes with the seed. ``seconds`` is
    a method's own time; the influence-guided rows also carry ``pool_gradient_seconds``, the one-off
    cost they share: the pool's per-sample gradients (the service keeps them in its index) and the
    damping (0.1 x mean GGN eigenvalue, estimated once on the model, not per run)."""
    pool_data, regression_data = prepare(pool), prepare(regression)
    rehearsal_data = prepare(rehearsal) if rehearsal is not None else None  # fine-tuning replays it (default: pool)
    regression_before = validate(model, regression_data)["ber"]
    guided = any(m.split(":")[0] in GUIDED for m in methods)
    # the pool's per-sample gradients depend on neither target nor seed: computed once
    start = time.perf_counter()
    space = ParameterSpace.convolutions(model.eval())
    pool_gradients = space.per_sample_gradients(pool_data) if guided else None
    if guided and config.update.curvature.damping is None:  # one damping for every run, as in the benchmarks
        fit = pool_data[draw(len(pool_data), config.update.fit_slots, seed=0)]
        curvature = replace(config.update.curvature, damping=default_damping(space, fit, config.update.curvature))
        config = replace(config, update=replace(config.update, curvature=curvature))
    pool_gradient_seconds = time.perf_counter() - start
    rows = []
    for seed in seeds:
        splits = {}
        for name, target in targets.items():
            order = np.random.default_rng(seed).permutation(len(target))
            if config.held_out_slots is None:  # adaptation slots first, every other slot held out
                adaptation_rows, held_rows = order[: config.adaptation_slots], order[config.adaptation_slots:]
                specialist_rows = adaptation_rows  # nothing else is left to train on
            else:  # held-out slots first: runs with other adaptation counts score the same held-out slots
                held_rows = order[: config.held_out_slots]
                adaptation_rows = order[config.held_out_slots: config.held_out_slots + config.adaptation_slots]
                specialist_rows = order[config.held_out_slots: config.held_out_slots + config.specialist_slots]
            splits[name] = (target.select(adaptation_rows), target.select(held_rows), target.select(specialist_rows))
        runs = [(name, {name: splits[name][1]}, splits[name][0]) for name in targets]
        if multi_target and len(targets) > 1:
            runs.append(("multi", {n: s[1] for n, s in splits.items()},
                         SlotBatch.concatenate([s[0] for s in splits.values()])))
        for run_name, held_outs, adaptation_slots in runs:
            run_methods = [m for m in methods if not (run_name == "multi" and m == "specialist")]  # per target only
            adaptation = prepare(adaptation_slots)
            # per held-out set: tensors, the unadapted model's BER and genie BER, computed once for all methods
            baselines = {}
            for name, slots in held_outs.items():
                data = prepare(slots)
                baselines[name] = (data, validate(model, data)["ber"], _genie_ber(slots))
            for method in run_methods:
                start = time.perf_counter()
                update = method_config(method, config.update, seed)
                torch.manual_seed(seed)
                details = {"gradient_evaluations": 0, "adaptation_slots": len(adaptation)}
                if method == "specialist":
                    adapted, details = train_specialist(model, splits[run_name][2], config, seed)
                elif update is None:
                    adapted = model
                else:
                    result = adapt(model, pool_data, adaptation, update, pool_gradients=pool_gradients,
                                   rehearsal=rehearsal_data)
                    adapted = result.model
                    details["gradient_evaluations"] = result.details.get("gradient_evaluations", 0)
                    if "best_step" in result.details:
                        details["best_step"] = result.details["best_step"]
                    if "refine" in result.details:
                        details["refine_accepted_steps"] = result.details["refine"]["accepted_steps"]
                seconds = time.perf_counter() - start
                non_target = validate(adapted, regression_data)["ber"] - regression_before
                for target_name, (held_out, before, genie) in baselines.items():
                    after = validate(adapted, held_out)["ber"]
                    rows.append({
                        "target": target_name if run_name != "multi" else f"multi:{target_name}",
                        "method": method, "seed": seed, "ber_before": before, "ber_after": after, "ber_genie": genie,
                        "gap_closure": (before - after) / (before - genie) if before > genie else 0.0,
                        "non_target_ber_change": non_target, "seconds": seconds, **details,
                    })
                    if method.split(":")[0] in GUIDED:
                        rows[-1]["pool_gradient_seconds"] = pool_gradient_seconds
                    if progress is not None:
                        progress(rows[-1])
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (target, method); ``of_specialist``: each row's
    gain (BER before - after) as a fraction of the specialist's mean gain on that target (over the
    seeds it ran: it is the costliest method, and what the architecture can reach on a condition
    barely depends on the split). NaN where no specialist ran or it gained nothing."""
    gains: dict[str, list[float]] = {}
    for r in rows:
        if r["method"] == "specialist":
            gains.setdefault(r["target"], []).append(r["ber_before"] - r["ber_after"])
    specialist = {target: float(np.mean(values)) for target, values in gains.items()}
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        reach = specialist.get(row["target"], 0.0)
        row = {**row, "of_specialist": (row["ber_before"] - row["ber_after"]) / reach if reach > 0 else np.nan}
        groups.setdefault((row["target"], row["method"]), []).append(row)
    summary = []
    for (target, method), items in groups.items():
        entry = {"target": target, "method": method, "seeds": len(items)}
        for key in ("ber_before", "ber_after", "ber_genie", "gap_closure", "of_specialist", "non_target_ber_change",
                    "seconds", "gradient_evaluations"):
            values = np.array([item.get(key, np.nan) for item in items], dtype=float)
            values = values[~np.isnan(values)]
            entry[key] = float(values.mean()) if len(values) else float("nan")
            entry[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary.append(entry)
    return summary


def format_table(summary: list[dict]) -> str:
    header = (f"{'target':>18} {'method':>28} {'BER before':>10} {'BER after':>16} {'genie':>8} "
              f"{'gap closure':>14} {'of specialist':>14} {'non-target dBER':>16} {'seconds':>8}")
    lines = [header, "-" * len(header)]
    for s in summary:
        lines.append(f"{s['target'][:18]:>18} {s['method'][:28]:>28} {s['ber_before']:>10.5f} "
                     f"{s['ber_after']:>9.5f}±{s['ber_after_std']:.4f} {s['ber_genie']:>8.5f} "
                     f"{s['gap_closure']:>8.3f}±{s['gap_closure_std']:.3f} "
                     f"{s['of_specialist']:>8.3f}±{s['of_specialist_std']:.3f} "
                     f"{s['non_target_ber_change']:>+9.5f}±{s['non_target_ber_change_std']:.4f} {s['seconds']:>8.1f}")
    return "\n".join(lines)


def plot(summary: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(s["target"] for s in summary))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    fig, ax = plt.subplots(figsize=(1.5 + 1.6 * len(targets), 4))
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        # a method not run on a target gets no bar (NaN), not a bar at zero
        values = [next((s for s in summary if s["target"] == t and s["method"] == method), None) for t in targets]
        ax.bar(np.arange(len(targets)) + i * width, [v["gap_closure"] if v else np.nan for v in values], width,
               yerr=[v["gap_closure_std"] if v else np.nan for v in values], label=method, capsize=2)
    ax.set_xticks(np.arange(len(targets)) + width * (len(methods) - 1) / 2, targets, rotation=15)
    ax.set_ylabel("gap closure toward genie")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
