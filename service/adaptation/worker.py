"""The adaptation worker: one background thread running jobs from a queue, never blocking inference.

A job: take the target's labelled slots from the sample store (a context key or explicit slot ids),
split them into an adaptation part and a held-out part, adapt the version serving the target with an
update rule on the pool, gate the candidate, publish it with lineage (parent, job, method, selected
slots, scope) and, if accepted, activate it. A job for a context (the default) makes a *scoped*
version that serves only that context: its gate asks for a better held-out target BER and no worse
BER on the context's most recent labelled slots (the guard); every other context keeps its version,
LLRs bit for bit. A *global* job (``global_update``, or explicit slot ids without a context) replaces
the global version and its gate also protects the training-mix regression set. After a swap the
worker watches the context's live BER on the new version and rolls back (that scope only) if it
regresses. Jobs and their outcomes are logged durably (``jobs.py``).
"""
from __future__ import annotations

import copy
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from schema.dataset import SlotBatch, read_slots
from service.adaptation.gate import GateConfig, gate
from service.adaptation.jobs import Job, JobLog
from service.adaptation.updates import GUIDED, METHODS, Selection, UpdateConfig, adapt
from service.influence.curvature import CurvatureConfig
from service.influence.index import GradientIndex, IndexConfig
from service.receiver.features import prepare
from service.serving.metrics import ServiceMetrics
from service.serving.registry import ModelRegistry, ScopeLimitError
from service.serving.store import SampleStore
from service.serving.threads import start_pinned_thread

log = logging.getLogger("deeprx.adaptation")


@dataclass
class AdaptationConfig:
    pool: str = ""  # HDF5 pool of labelled slots; empty: the store's labelled slots of other contexts
    regression: str = ""  # HDF5 slots of the training mix the gate protects; empty: no regression check
    regression_slots: int = 256
    held_out_fraction: float = 0.4
    min_target_slots: int = 16
    rehearsal: str = ""  # HDF5 slots of the training mix that fine-tuning rehearses; empty: the pool
    rehearsal_slots: int = 2000
    # target-only closes the most of the gap on held-out slots where the model has something to learn
    # (docs/adaptation.md, 5 seeds): a training-mix pool cannot teach a new condition
    method: str = "target-only"
    k: int = 64
    steps: int = 400  # Adam steps of 16 slots
    # global updates: 15 of 16 slots rehearsed, a gentle rate: fitting only drift slots erases what the
    # model knew of the training mix, which every other context still needs
    learning_rate: float = 3e-4
    replay: float = 0.9375  # fraction of each fine-tuning minibatch drawn from the rehearsal slots
    # scoped updates serve only their context (its own guard protects it): no rehearsal, a faster rate
    scoped_learning_rate: float = 1e-3
    scoped_replay: float = 0.0
    curvature: str = "ekfac"
    # target-only / target+first-order: hold out this part of the adaptation slots and keep the best
    # checked step (the unchanged model included), then refine with Levenberg-Marquardt steps
    validation_fraction: float = 0.0
    refine_iterations: int = 0
    min_relative_improvement: float = 0.02
    max_regression: float = 0.002  # absolute BER rise allowed on the regression set (global) or the guard (scoped)
    guard_slots: int = 64  # scoped jobs: the context's newest labelled slots outside the adaptation split
    rollback_slots: int = 50  # live slots on the new version before the rollback check
    rollback_margin: float = 0.1  # roll back when live BER > held-out BER before adaptation x (1 + margin)
    index_compression: str = "sjlt:4096"  # sketch of the gradient index over the pool file ("" = exact)
    auto: bool = False  # targets found by the monitor start jobs by themselves ...
    cooldown_s: float = 600.0  # ... at most once per context in this many seconds
    seed: int = 0
    # torch CPU threads of the job (0: one per core); the server's other threads run torch on one
    # (service/serving/threads.py: two multi-threaded torch threads on few cores halve the job's speed)
    threads: int = 0


# what a TriggerAdaptation request may override in its options map, and how each value is read
JOB_OPTIONS = {"k": int, "steps": int, "learning_rate": float, "replay": float, "curvature": str,
               "validation_fraction": float, "refine_iterations": int}


class AdaptationError(ValueError):
    """A job that cannot be queued (bad method, unknown target); the message says why."""


class AdaptationWorker:
    def __init__(self, registry: ModelRegistry, store: SampleStore, metrics: ServiceMetrics,
                 config: AdaptationConfig):
        self.registry, self.store, self.metrics, self.config = registry, store, metrics, config
        self._log = JobLog(store.path)
        self._jobs: dict[str, Job] = {job.job_id: job for job in self._log.recover()}
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._ids = itertools.count(max((j.number for j in self._jobs.values()), default=0) + 1)
        self._lock = threading.Lock()
        self._stage_start = 0.0
        self._watch: dict[tuple[str, str], list[int]] = {}  # (context, version) -> [errors, bits, slots]
        self._last_auto: dict[str, float] = {}
        self._regression = self._load(config.regression, config.regression_slots)
        self._rehearsal = self._load(config.rehearsal, config.rehearsal_slots)
        self._pool_file = read_slots(config.pool)[0] if config.pool else None  # read once, not per job
        for method in METHODS:  # every series exists from the start, so a first failure is an increase
            for outcome in ("accepted", "rejected", "failed"):
                metrics.adaptation_jobs.labels(method, outcome)
        # the jobs' thread is the one that runs torch on several cores (``torch_threads`` of them)
        self._thread, self.torch_threads = start_pinned_thread(self._run, "adaptation-worker", config.threads)

    @staticmethod
    def _load(path: str, slots: int):
        """The first ``slots`` slots of an HDF5 file as model tensors (None without a file)."""
        return prepare(read_slots(path, slice(0, slots))[0]) if path else None

    # ------------------------------------------------------------------ API used by the RPCs
    def submit(self, context: str, slot_ids: list[str], method: str, options: dict[str, str],
               global_update: bool = False) -> Job:
        """Queue a job; scoped to ``context`` unless ``global_update`` (or no context is given)."""
        method = method or self.config.method
        if method not in METHODS:
            raise AdaptationError(f"method: '{method}' is not one of {', '.join(METHODS)}")
        if not context and not slot_ids:
            raise AdaptationError("target: give a context or slot_ids")
        unknown = set(options) - set(JOB_OPTIONS)
        if unknown:
            raise AdaptationError(f"options: unknown keys {sorted(unknown)} ({', '.join(JOB_OPTIONS)})")
        scope = "global" if global_update or not context else context
        try:
            self._update_config(method, options, scoped=scope != "global")
        except ValueError as error:
            raise AdaptationError(f"options: {error}") from error
        job = Job(f"job-{next(self._ids)}", context, list(slot_ids), method, scope=scope, options=dict(options))
        self._log.save(job)
        with self._lock:
            self._jobs[job.job_id] = job
        self._queue.put(job)
        return job

    def consider(self, context: str, is_target: bool) -> Job | None:
        """Auto mode: queue a job for a context that just met the target rule, unless one is pending
        or the context's cooldown has not passed."""
        if not (self.config.auto and is_target):
            return None
        now = time.monotonic()
        with self._lock:
            pending = any(j.context == context and j.state in ("QUEUED", "RUNNING") for j in self._jobs.values())
            if pending or now - self._last_auto.get(context, -float("inf")) < self.config.cooldown_s:
                return None
            self._last_auto[context] = now
        log.info("auto adaptation for target '%s'", context)
        return self.submit(context, [], self.config.method, {})

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        with self._lock:
            return sorted(self._jobs.values(), key=lambda j: j.created)

    def close(self, timeout: float | None = None) -> None:
        """Stop after the running job (or give up waiting after ``timeout``: the thread is a daemon,
        and a version it was writing stays in the registry's temp area, removed at the next start)."""
        self._queue.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._log.close()

    def observe(self, context: str, version: str, errors: int, bits: int) -> None:
        """Feedback on a slot served by ``version``: checks watched swaps for regressions."""
        key = (context, version)
        with self._lock:
            if key not in self._watch:
                return
            counts = self._watch[key]  # [errors, bits, slots]
            counts[0] += errors
            counts[1] += bits
            counts[2] += 1
            if counts[2] < self.config.rollback_slots:
                return
            del self._watch[key]
            job = next((j for j in self._jobs.values() if j.new_version == version), None)
        if job is None:
            return
        live = counts[0] / max(1, counts[1])
        limit = job.ber_before * (1 + self.config.rollback_margin)
        if live <= limit or self._serving(job.context, job.scope) != version:
            return
        if job.scope == "global":
            self.registry.activate(job.parent_version)
        elif job.parent_scoped:
            self.registry.activate(job.parent_version, job.context)
        else:
            self.registry.release(job.context)
        job.rolled_back = True
        job.message += f"; rolled back: live BER {live:.5f} > {limit:.5f}"
        self._log.save(job)
        self.metrics.adaptation_rollbacks.inc()
        log.warning("%s: rolled back %s -> %s in scope %s (live BER %.5f)", job.job_id, version,
                    job.parent_version, job.scope, live)

    def _serving(self, context: str, scope: str) -> str | None:
        """The version a job's scope is served by now."""
        serving = self.registry.active if scope == "global" else self.registry.active_for(context)
        return serving.version if serving else None

    # ------------------------------------------------------------------ the worker thread
    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            job.state = "RUNNING"
            self._log.save(job)
            start = time.perf_counter()
            try:
                self._adapt(job)
            except ScopeLimitError as err:
                job.state, job.message = "FAILED", f"not activated: {err}"
            except Exception as err:  # noqa: BLE001 - a failed job is reported, the worker goes on
                log.exception("%s failed", job.job_id)
                job.state, job.message = "FAILED", f"{type(err).__name__}: {err}"
            job.progress = 1.0
            self._log.save(job)
            self.metrics.adaptation_jobs.labels(job.method, job.state.lower()).inc()
            self.metrics.adaptation_seconds.observe(time.perf_counter() - start)

    def _target(self, job: Job) -> tuple[SlotBatch, np.ndarray]:
        """The target's labelled slots sorted by slot id (concurrent streams store in varying order;
        the split must not vary), and each one's arrival rank (0 = oldest)."""
        self.store.flush()  # labels that triggered the job may still be queued for the writer
        slots, ids = self.store.labelled(context=job.context or None)
        if job.slot_ids:
            wanted = set(job.slot_ids)
            keep = [i for i, slot_id in enumerate(ids) if slot_id in wanted]
            slots, ids = slots.select(np.asarray(keep, int)), [ids[i] for i in keep]
        if len(ids) < self.config.min_target_slots:
            raise AdaptationError(f"target has {len(ids)} labelled slots, needs {self.config.min_target_slots}")
        by_id = np.argsort(ids, kind="stable")
        return slots.select(by_id), by_id

    def _pool(self, job: Job) -> SlotBatch:
        if self._pool_file is not None:
            return self._pool_file
        slots, _ = self.store.labelled()
        return slots.select(slots.channel != job.context)

    def index_directory(self):
        return self.store.directory.parent / "influence-index"

    def _select_from_index(self, model, version: str, pool: SlotBatch, adaptation: SlotBatch,
                           config: UpdateConfig) -> Selection:
        """Top-k beneficial pool rows from the gradient index, rebuilt first if another version built it."""
        index = GradientIndex(self.index_directory())
        ids = [f"pool-{row}" for row in range(len(pool))]
        if index.is_stale(version) or index.slot_ids() != ids:
            order = np.random.default_rng(self.config.seed).permutation(len(pool))[: config.fit_slots]
            index.build(model, version, pool, ids, [ids[i] for i in order],
                        IndexConfig(config.curvature, self.config.index_compression or None), progress=False)
            self.metrics.influence_index_builds.inc()
        self.metrics.influence_index_stale.set(0)
        result = index.query(model, version, adaptation, config.k, score=config.score)
        rows = torch.tensor([int(slot_id.split("-")[1]) for slot_id in result.slot_ids])
        return Selection(rows, result.scores)

    def _stage(self, job: Job, name: str, progress: float) -> None:
        """Enter a stage: the time of the one before is recorded, progress reported."""
        now = time.perf_counter()
        if job.stage:
            job.stage_seconds[job.stage] = round(now - self._stage_start, 2)
        job.stage, job.progress, self._stage_start = name, progress, now
        self._log.save(job)  # a crash report names the stage it interrupted

    def _update_config(self, method: str, options: dict[str, str], scoped: bool) -> UpdateConfig:
        """The job's update settings: the worker's defaults (scoped ones for a scoped job) overridden
        by the request's options; ValueError names a bad value."""
        defaults = {"k": self.config.k, "steps": self.config.steps, "curvature": self.config.curvature,
                    "learning_rate": self.config.scoped_learning_rate if scoped else self.config.learning_rate,
                    "replay": self.config.scoped_replay if scoped else self.config.replay,
                    "validation_fraction": self.config.validation_fraction,
                    "refine_iterations": self.config.refine_iterations}
        settings = {}
        for key, read in JOB_OPTIONS.items():
            try:
                settings[key] = read(options.get(key, defaults[key]))
            except ValueError:
                raise ValueError(f"{key}={options[key]!r} is not {read.__name__}") from None
        curvature = CurvatureConfig(method=settings.pop("curvature"))
        return UpdateConfig(method=method, curvature=curvature, seed=self.config.seed, **settings)

    def _adapt(self, job: Job) -> None:
        scoped = job.scope != "global"
        parent = self.registry.active_for(job.context) if scoped else self.registry.active
        job.parent_version = parent.version
        job.parent_scoped = scoped and job.context in self.registry.scopes()
        self._stage(job, "reading target slots", 0.02)
        slots, arrival = self._target(job)
        order = np.random.default_rng(self.config.seed).permutation(len(slots))
        n_held = max(1, int(round(self.config.held_out_fraction * len(slots))))
        held_rows, adaptation_rows = order[:n_held], order[n_held:]
        adaptation_slots = slots.select(adaptation_rows)
        held_out, adaptation = prepare(slots.select(held_rows)), prepare(adaptation_slots)
        pool_slots = self._pool(job)
        config = self._update_config(job.method, job.options, scoped)
        model = copy.deepcopy(parent.model).cpu()  # the serving copy stays where it is
        pool = prepare(pool_slots)
        selection = None
        if self.config.pool and job.method in GUIDED and config.score in ("raw", "l-relative"):
            self._stage(job, "influence index", 0.1)
            # the index is the global version's: scoped versions leave it valid, so a context's next
            # job retrieves without a rebuild; its update still starts from the context's own version
            index_model = self.registry.active
            selection = self._select_from_index(copy.deepcopy(index_model.model).cpu(), index_model.version,
                                                pool_slots, adaptation_slots, config)
        self._stage(job, "update", 0.4)

        def updating(done: float) -> None:  # the update is the long stage: its bar moves with its steps
            job.progress = 0.4 + 0.4 * done

        result = adapt(model, pool, adaptation, config, selection, rehearsal=self._rehearsal, progress=updating)
        if result.selected is not None and len(result.selected):
            picked = result.selected.numpy()
            channels = Counter(pool_slots.channel[picked].tolist()).most_common(3)
            job.selected_summary = (f"{len(picked)} slots; channels {dict(channels)}; mean speed "
                                    f"{np.nanmean(pool_slots.speed_mps[picked]):.0f} m/s; mean SNR "
                                    f"{np.nanmean(pool_slots.snr_db[picked]):.1f} dB")
            self.metrics.adaptation_selected_slots.observe(len(picked))
        self._stage(job, "gate", 0.8)
        if scoped:  # the guard: the context's newest labelled slots the update did not train on
            outside = np.setdiff1d(np.arange(len(slots)), adaptation_rows)
            newest = outside[np.argsort(-arrival[outside], kind="stable")][: self.config.guard_slots]
            protected, tolerance, name = (prepare(slots.select(np.sort(newest))), self.config.max_regression,
                                          "guard (the context's newest slots)")
        elif self._regression is not None:
            protected, tolerance, name = self._regression, self.config.max_regression, "regression set"
        else:
            protected, tolerance, name = held_out, float("inf"), "held-out target"
        decision = gate(model, result.model, held_out, protected,
                        GateConfig(self.config.min_relative_improvement, tolerance, name))
        job.ber_before, job.ber_after = decision.target_ber_before, decision.target_ber_after
        job.regression_ber_before, job.regression_ber_after = decision.regression_ber_before, decision.regression_ber_after
        self.metrics.adaptation_ber.labels("before").set(job.ber_before)
        self.metrics.adaptation_ber.labels("after").set(job.ber_after)
        self._stage(job, "publish", 0.9)
        job.new_version = self.registry.publish(
            result.model, creator=f"adaptation {job.job_id}", parent=parent.version,
            metrics={"target_ber_before": job.ber_before, "target_ber_after": job.ber_after,
                     "regression_ber_before": job.regression_ber_before,
                     "regression_ber_after": job.regression_ber_after},
            extra={"job": job.job_id, "method": job.method, "context": job.context, "accepted": decision.accepted,
                   "adapted_for": job.context if scoped else "", "guard": "context's newest slots" if scoped else
                   "training-mix regression set", "selected_summary": job.selected_summary,
                   "details": _jsonable(result.details), "rehearsal": self.config.rehearsal or "pool",
                   "replay": config.replay})
        job.message = decision.reason
        if decision.accepted:
            with self._lock:
                self._watch[(job.context, job.new_version)] = [0, 0, 0]
            self.registry.activate(job.new_version, job.context if scoped else None)
            job.state = "ACCEPTED"
        else:
            job.state = "REJECTED"
        self._stage(job, "", 1.0)


def _jsonable(details: dict) -> dict:
    return {k: (float(v) if isinstance(v, (float, np.floating, torch.Tensor)) else v) for k, v in details.items()}

