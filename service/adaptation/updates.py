"""Update rules that adapt DeepRx to a target, and the baselines they are compared with.

- ``first-order``: fine-tune on the top-k beneficial pool slots (most negative influence);
- ``second-order``: a few Levenberg-Marquardt steps on the target's adaptation loss. The first
  direction is influence-aligned, ``d = -H^-1 sum_z w_z g(z)`` over the beneficial set (``w_z``
  proportional to ``-I(z, T)``, normalised to sum 1; H the retrieval's curvature); later ones are
  re-scored at the new parameters, ``d = -H^-1 g_T``. Each step length comes from the quadratic
  model, ``eta* = -g^T d / d^T (G + lambda I) d`` with an exact GGN-vector product on the
  adaptation slots; lambda follows the ratio of actual to predicted decrease, and a step that does
  not lower the loss is rejected;
- ``random``: fine-tune on k pool slots drawn uniformly (same k and steps as first-order);
- ``target-only``: fine-tune on the target's own adaptation slots;
- ``target+first-order``: fine-tune on the target's own slots together with the top-k beneficial
  pool slots (scored against the target's gradient): the labels lead, influence adds the pool slots
  that pull the same way.

Two options apply to the rules that fine-tune on the target's own slots: ``validation_fraction``
holds that part of them out and keeps the checked weights (the unchanged model included) with the
lowest BER on it, so a condition with little to learn is not overfitted; ``refine_iterations``
follows the fine-tuning with Levenberg-Marquardt steps along ``-H^-1 g_T`` on all adaptation slots
(the second-order rule's optimiser), which gains where fine-tuning stops short.

Every rule returns a new model; the input model is never modified. Batch norm stays in eval mode
during fine-tuning (running statistics frozen), matching the per-sample gradients influence used.
Fine-tuning rules rehearse: a ``replay`` fraction of every minibatch is drawn uniformly from a
rehearsal set (slots of the training mix when the operator has them, else the whole pool), so
fitting a narrow selection erases less of what the model knew (catastrophic forgetting), at the
same number of steps and slots per step.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from service.influence.curvature import CurvatureConfig
from service.influence.gradients import ParameterSpace
from service.influence.inverse import fit_curvature
from service.influence.scores import influence, normalised
from service.receiver.features import SlotTensors
from service.receiver.loss import bce_bits, per_slot_bce_bits
from service.receiver.model import DeepRx
from service.receiver.train import validate

METHODS = ("first-order", "second-order", "random", "target-only", "target+first-order")
Progress = Callable[[float], None]  # hears the fraction of an update done, 0..1
GUIDED = ("first-order", "second-order", "target+first-order")  # the rules that rank the pool by influence


@dataclass
class UpdateConfig:
    method: str = "first-order"
    k: int = 64  # pool slots selected
    steps: int = 50  # fine-tuning steps
    batch_size: int = 16
    learning_rate: float = 3e-4
    score: str = "l-relative"  # ranking score for selection
    curvature: CurvatureConfig = field(default_factory=lambda: CurvatureConfig(method="ekfac"))
    fit_slots: int = 256
    second_order_iterations: int = 5  # Levenberg-Marquardt steps of the second-order rule
    validation_fraction: float = 0.0  # target slots held out to pick the best checked fine-tuning step
    check_every: int = 50  # fine-tuning steps between validation checks
    refine_iterations: int = 0  # Levenberg-Marquardt steps after fine-tuning on the target's slots
    replay: float = 0.5  # fraction of each fine-tuning minibatch drawn from the rehearsal slots
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown update method '{self.method}' (one of {', '.join(METHODS)})")
        if not 0.0 <= self.replay < 1.0:
            raise ValueError(f"replay must be in [0, 1), got {self.replay}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")


@dataclass
class UpdateResult:
    model: DeepRx
    selected: torch.Tensor | None  # pool indices used (None for target-only)
    scores: torch.Tensor | None  # their influence scores
    details: dict


def target_loss(model: DeepRx, data: SlotTensors) -> float:
    """Mean BCE-in-bits of ``model`` (eval mode) on ``data``."""
    model.eval()
    with torch.no_grad():
        return float(per_slot_bce_bits(model(data.features, data.bits_per_symbol), data.labels, data.valid).mean())


def _concatenate(first: SlotTensors, second: SlotTensors) -> SlotTensors:
    return SlotTensors(*(torch.cat([getattr(first, f.name), getattr(second, f.name)]) for f in fields(SlotTensors)))


@dataclass
class EarlyStop:
    """Fine-tune until BER on ``validation`` has not fallen for ``patience`` checks ``every`` steps
    apart, and keep the best weights (step 0, the unchanged model, is the first check);
    ``history`` records (step, BER) of each check."""

    validation: SlotTensors
    every: int = 200
    patience: int = 2
    history: list[tuple[int, float]] = field(default_factory=list)

    @property
    def best_step(self) -> int:
        return min(self.history, key=lambda item: item[1])[0] if self.history else 0

    @property
    def steps_run(self) -> int:
        return self.history[-1][0] if self.history else 0


def fine_tune(model: DeepRx, data: SlotTensors, config: UpdateConfig, rehearsal: SlotTensors | None = None,
              early_stop: EarlyStop | None = None, progress: Progress | None = None) -> DeepRx:
    """Adam on ``data`` for ``config.steps`` minibatches, ``config.replay`` of each drawn from
    ``rehearsal`` when given; a copy of ``model`` is trained, BN statistics frozen. With
    ``early_stop``, ``config.steps`` is the cap and the best checked weights are returned.
    ``progress`` hears the fraction of steps done after each step."""
    tuned = copy.deepcopy(model).eval()
    for parameter in tuned.parameters():  # served models are frozen; the copy is trained
        parameter.requires_grad_(True)
    optimiser = torch.optim.Adam(tuned.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(config.seed)
    size = min(config.batch_size, len(data))
    replayed = int(round(config.replay * size)) if rehearsal is not None and len(rehearsal) else 0
    best, worse_checks = None, 0
    if early_stop is not None:
        best = (validate(tuned, early_stop.validation)["ber"], copy.deepcopy(tuned.state_dict()))
        early_stop.history.append((0, best[0]))
    for step in range(1, config.steps + 1):
        batch = data[torch.randint(0, len(data), (size - replayed,), generator=generator)]
        if replayed:
            batch = _concatenate(batch, rehearsal[torch.randint(0, len(rehearsal), (replayed,), generator=generator)])
        loss = bce_bits(tuned(batch.features, batch.bits_per_symbol), batch.labels, batch.valid)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if progress is not None:
            progress(step / config.steps)
        if early_stop is not None and (step % early_stop.every == 0 or step == config.steps):
            ber = validate(tuned, early_stop.validation)["ber"]
            early_stop.history.append((step, ber))
            if ber < best[0]:
                best, worse_checks = (ber, copy.deepcopy(tuned.state_dict())), 0
            else:
                worse_checks += 1
                if worse_checks >= early_stop.patience:
                    break
    if best is not None:
        tuned.load_state_dict(best[1])
    return tuned.eval()


def _fine_tuning_evaluations(config: UpdateConfig) -> int:
    """Slot gradients a fine-tuning run computes (steps x batch), rehearsed slots included."""
    return config.steps * config.batch_size


def draw(size: int, count: int, seed: int) -> torch.Tensor:
    """``count`` distinct indices of ``range(size)``, the same ones for the same seed."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count]


def _fit_on_pool(space: ParameterSpace, pool: SlotTensors, config: UpdateConfig):
    """H fitted on ``config.fit_slots`` pool slots drawn with ``config.seed``."""
    return fit_curvature(space, pool[draw(len(pool), config.fit_slots, config.seed)], config.curvature)


def select_beneficial(model: DeepRx, pool: SlotTensors, target: SlotTensors, config: UpdateConfig,
                      gradients: torch.Tensor | None = None):
    """Scores of the pool for the target, the top-k beneficial indices, and the curvature used.
    ``gradients``: the pool's per-sample gradients on ``model`` if already computed (they do not
    depend on the target)."""
    space = ParameterSpace.convolutions(model.eval())
    curvature = _fit_on_pool(space, pool, config)
    gradients = space.per_sample_gradients(pool) if gradients is None else gradients
    target_gradient = space.mean_gradient(target)
    scores = normalised(config.score, target_gradient, gradients, curvature)
    order = torch.argsort(scores)
    selected = order[: config.k][scores[order[: config.k]] < 0]  # beneficial only
    return scores, selected, curvature, gradients, space


def _with_parameters(model: DeepRx, space: ParameterSpace, theta: torch.Tensor) -> DeepRx:
    candidate = copy.deepcopy(model)
    params = dict(candidate.named_parameters())
    with torch.no_grad():
        for name, value in space.unflatten(theta).items():
            params[name].copy_(value)
    return candidate.eval()


def second_order_step(model: DeepRx, curvature, first_direction: torch.Tensor, adaptation: SlotTensors,
                      iterations: int, progress: Progress | None = None) -> tuple[DeepRx, dict]:
    """Levenberg-Marquardt on the mean adaptation loss, starting along ``first_direction`` (a descent
    candidate, e.g. the influence-aligned ``-H^-1 sum w g``), then along ``-H^-1 g`` re-scored at
    each accepted point. ``gradient_evaluations`` counts slot passes (gradients and GGN products)."""
    damping = max(float(getattr(curvature, "damping", 0.0)), 1e-8)
    loss = target_loss(model, adaptation)
    steps, evaluations, direction = [], 0, first_direction
    for iteration in range(iterations):
        space = ParameterSpace.convolutions(model.eval())
        gradient = space.mean_gradient(adaptation)
        if direction is None:
            direction = -curvature.solve(gradient)
        slope = float(gradient @ direction)
        product = space.ggn_vector_product(adaptation, direction)
        evaluations += 2 * len(adaptation)
        if slope >= 0:  # not a descent direction at this point: nothing left to gain along it
            steps.append({"slope": slope, "accepted": False})
            break
        quadratic = float(direction @ product) + damping * float(direction @ direction)
        eta = -slope / quadratic
        predicted = 0.5 * slope * slope / quadratic  # the quadratic model's decrease at eta*
        candidate = _with_parameters(model, space, space.flatten(space.values()) + eta * direction)
        new_loss = target_loss(candidate, adaptation)
        rho = (loss - new_loss) / predicted
        accepted = new_loss < loss
        steps.append({"eta": eta, "step_norm": eta * float(direction.norm()), "rho": rho, "damping": damping,
                      "loss": new_loss, "accepted": accepted})
        damping *= 2 / 3 if rho > 0.75 else (1.5 if rho < 0.25 else 1.0)
        if accepted:
            model, loss, direction = candidate, new_loss, None
        if progress is not None:
            progress((iteration + 1) / iterations)
    return model.eval(), {"adaptation_loss": loss, "steps": steps, "accepted_steps": sum(s["accepted"] for s in steps),
                          "gradient_evaluations": evaluations}


def _tune_on_target(model: DeepRx, adaptation: SlotTensors, config: UpdateConfig, pool: SlotTensors,
                    rehearsal: SlotTensors, extra: SlotTensors | None = None, curvature=None,
                    progress: Progress | None = None) -> tuple[DeepRx, dict]:
    """Fine-tune on the target's ``adaptation`` slots (with ``extra`` pool slots), with the
    ``validation_fraction`` and ``refine_iterations`` options; ``curvature`` (else fitted on the
    pool) preconditions the refinement. Gradient evaluations count the steps actually run."""
    train, stop = adaptation, None
    if config.validation_fraction > 0:
        order = draw(len(adaptation), len(adaptation), config.seed)
        held = max(1, round(config.validation_fraction * len(adaptation)))
        stop = EarlyStop(adaptation[order[:held]], every=config.check_every)
        train = adaptation[order[held:]]
    share = 0.8 if config.refine_iterations else 1.0  # of the progress, for fine-tuning
    tuned = fine_tune(model, train if extra is None else _concatenate(train, extra), config, rehearsal=rehearsal,
                      early_stop=stop, progress=None if progress is None else lambda done: progress(share * done))
    steps = config.steps if stop is None else stop.steps_run
    details = {"slots": len(train) + (0 if extra is None else len(extra)),
               "gradient_evaluations": steps * config.batch_size}
    if stop is not None:
        details.update(best_step=stop.best_step, validation_slots=len(stop.validation))
    if config.refine_iterations:
        if curvature is None:
            curvature = _fit_on_pool(ParameterSpace.convolutions(model.eval()), pool, config)
        tuned, refine = second_order_step(tuned, curvature, None, adaptation, config.refine_iterations,
                                          None if progress is None else lambda done: progress(share + (1 - share) * done))
        details["gradient_evaluations"] += refine.pop("gradient_evaluations")
        details["refine"] = refine
    return tuned, details


@dataclass
class Selection:
    """Pool rows already ranked elsewhere (e.g. by the gradient index): indices and their scores."""

    indices: torch.Tensor
    scores: torch.Tensor


def adapt(model: DeepRx, pool: SlotTensors, adaptation: SlotTensors, config: UpdateConfig,
          selection: Selection | None = None, pool_gradients: torch.Tensor | None = None,
          rehearsal: SlotTensors | None = None, progress: Progress | None = None) -> UpdateResult:
    """Apply ``config.method`` to adapt ``model`` to the target's ``adaptation`` slots. For the
    influence-guided rules, ``selection`` (beneficial rows found by the index) skips scoring the
    pool, and ``pool_gradients`` (per-sample, on ``model``) skips recomputing them. Fine-tuning
    rehearses ``rehearsal`` (e.g. slots of the original training mix), by default the pool."""
    rehearsal = pool if rehearsal is None else rehearsal
    if config.method == "target-only":
        tuned, details = _tune_on_target(model, adaptation, config, pool, rehearsal, progress=progress)
        return UpdateResult(tuned, None, None, {"method": config.method, **details})
    if config.method == "random":
        chosen = draw(len(pool), config.k, config.seed)
        tuned = fine_tune(model, pool[chosen], config, rehearsal=rehearsal, progress=progress)
        return UpdateResult(tuned, chosen, None, {"method": config.method, "slots": len(chosen),
                                                  "gradient_evaluations": _fine_tuning_evaluations(config)})
    if selection is None:
        scores, selected, curvature, gradients, space = select_beneficial(model, pool, adaptation, config,
                                                                          pool_gradients)
        selected_scores, source = scores[selected], "pool scan"
    else:
        keep = selection.scores < 0
        selected, selected_scores, source = selection.indices[keep], selection.scores[keep], "gradient index"
    details = {"method": config.method, "slots": int(len(selected)), "selection": source}
    if config.method == "target+first-order":  # the target's own slots lead, beneficial pool slots join them
        tuned, tuning = _tune_on_target(model, adaptation, config, pool, rehearsal, extra=pool[selected],
                                        curvature=curvature if selection is None else None, progress=progress)
        return UpdateResult(tuned, selected, selected_scores, {**details, **tuning})
    if len(selected) == 0:
        return UpdateResult(copy.deepcopy(model).eval(), selected, selected_scores, {**details, "note": "none beneficial"})
    if config.method == "first-order":
        tuned = fine_tune(model, pool[selected], config, rehearsal=rehearsal, progress=progress)
        return UpdateResult(tuned, selected, selected_scores,
                            {**details, "gradient_evaluations": _fine_tuning_evaluations(config)})
    if selection is None:
        selected_gradients = gradients[selected]
    else:  # the second-order step needs H and the selected rows' gradients
        space = ParameterSpace.convolutions(model.eval())
        curvature = _fit_on_pool(space, pool, config)
        selected_gradients = space.per_sample_gradients(pool[selected])
    raw = influence(space.mean_gradient(adaptation), selected_gradients, curvature)
    weights = (-raw).clamp_min(0) / (-raw).clamp_min(0).sum().clamp_min(1e-30)
    first = -curvature.solve(weights @ selected_gradients)
    tuned, step = second_order_step(model, curvature, first, adaptation, config.second_order_iterations, progress)
    return UpdateResult(tuned, selected, selected_scores, {**details, **step})
