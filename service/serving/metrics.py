"""Every Prometheus metric the service exports, declared once, on one registry per server.

Names follow Prometheus practice: ``deeprx_`` prefix, base units (seconds, bytes), ``_total`` on
counters, and only bounded labels (method, outcome, gRPC code, and a capped set of contexts).
"""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
OTHER_CONTEXT = "_other"
REJECTION_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAVAILABLE",
                   "UNAUTHENTICATED", "PERMISSION_DENIED", "INTERNAL")


class ServiceMetrics:
    """The metric objects of one server; tests build one per server on a private registry."""

    def __init__(self, registry: CollectorRegistry, max_contexts: int = 64):
        self.registry = registry
        self.max_contexts = max_contexts
        self._contexts: set[str] = set()
        self._lock = threading.Lock()
        r = registry
        self.requests = Counter("deeprx_requests", "RPCs handled, by method and outcome",
                                ["method", "outcome"], registry=r)
        self.rejected_requests = Counter("deeprx_rejected_requests", "RPCs rejected, by gRPC status code",
                                         ["code"], registry=r)
        self.slots = Counter("deeprx_slots", "Slots received, by outcome (ok, rejected, failed)",
                             ["outcome"], registry=r)
        self.inference_seconds = Histogram("deeprx_inference_seconds",
                                           "Featurization and model forward time per batch",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.featurize_seconds = Histogram("deeprx_featurize_seconds",
                                           "Featurization time per batch (part of deeprx_inference_seconds; the "
                                           "first batch of a new grid layout includes exporting its featurizer)",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.observations_dropped = Counter("deeprx_slot_observations_dropped",
                                            "Served slots whose label-free estimates were skipped (observer queue "
                                            "full)", registry=r)
        self.slot_latency_seconds = Histogram("deeprx_slot_latency_seconds",
                                              "Server-side time from a slot's arrival to its result",
                                              buckets=LATENCY_BUCKETS, registry=r)
        self.queue_delay_seconds = Histogram("deeprx_queue_delay_seconds",
                                             "Time a slot waited in the batching queue",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("deeprx_batch_size", "Slots per model forward pass",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.model = Info("deeprx_model", "The active model version", registry=r)
        self.model_swaps = Counter("deeprx_model_swaps", "Changes of what serves: the global version or a "
                                   "context's scoped version", registry=r)
        self.scoped_versions = Gauge("deeprx_scoped_versions", "Contexts served by a version scoped to them",
                                     registry=r)
        self.captured_samples = Counter("deeprx_captured_samples", "Slots written to the sample store",
                                        registry=r)
        self.capture_dropped = Counter("deeprx_capture_dropped_samples",
                                       "Slots not captured because the capture queue was full", registry=r)
        self.feedback = Counter("deeprx_feedback", "Feedback items, by kind (genie, crc_ok, crc_fail, unknown)",
                                ["kind"], registry=r)
        self.feedback_bits = Counter("deeprx_feedback_bits", "Coded bits with feedback labels, by context",
                                     ["context"], registry=r)
        self.feedback_bit_errors = Counter("deeprx_feedback_bit_errors",
                                           "Served hard-decision bit errors measured by feedback, by context",
                                           ["context"], registry=r)
        self.context_ber = Gauge("deeprx_context_ber",
                                 "Served BER over the last feedback window of each context", ["context"], registry=r)
        self.context_ber_estimate = Gauge("deeprx_context_ber_estimate",
                                          "Label-free expected BER from the served LLRs, mean sigma(-|LLR|) over "
                                          "the last window of each context", ["context"], registry=r)
        self.context_pilot_sinr = Gauge("deeprx_context_pilot_sinr_decibels",
                                        "Label-free DMRS residual SINR (pilot-based, no model) over the last "
                                        "window of each context", ["context"], registry=r)
        self.store_samples = Gauge("deeprx_store_samples", "Samples held in the sample store", registry=r)
        self.store_bytes = Gauge("deeprx_store_bytes", "Size of the sample store on disk", registry=r)
        self.targets = Gauge("deeprx_targets", "Contexts currently meeting the target rule", registry=r)
        self.adaptation_jobs = Counter("deeprx_adaptation_jobs", "Adaptation jobs by method and outcome",
                                       ["method", "outcome"], registry=r)
        self.adaptation_seconds = Histogram("deeprx_adaptation_seconds", "Adaptation job duration",
                                            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800), registry=r)
        self.adaptation_selected_slots = Histogram("deeprx_adaptation_selected_slots",
                                                   "Pool slots selected by an adaptation job",
                                                   buckets=(1, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.adaptation_ber = Gauge("deeprx_adaptation_ber", "Held-out target BER of the last job, before/after",
                                    ["stage"], registry=r)
        self.influence_index_builds = Counter("deeprx_influence_index_builds",
                                              "Gradient index (re)builds, e.g. after it went stale on a swap",
                                              registry=r)
        self.influence_index_stale = Gauge("deeprx_influence_index_stale",
                                           "1 while the gradient index was built on another model version",
                                           registry=r)
        self.adaptation_rollbacks = Counter("deeprx_adaptation_rollbacks",
                                            "Swaps rolled back after live BER regressed", registry=r)
        self.scoped_version = Gauge("deeprx_scoped_version_info",
                                    "1 for each context served by a version scoped to it (at most models.max_scoped)",
                                    ["context", "version"], registry=r)
        for code in REJECTION_CODES:  # every series exists from the start, so a first rejection is an increase
            self.rejected_requests.labels(code)

    def show_scopes(self, scopes: dict[str, str]) -> None:
        """Make ``deeprx_scoped_version_info`` and ``deeprx_scoped_versions`` say exactly ``scopes``."""
        with self._lock:
            self.scoped_version.clear()
            for context, version in scopes.items():
                self.scoped_version.labels(context, version).set(1)
            self.scoped_versions.set(len(scopes))

    def context_label(self, context: str) -> str:
        """The label for ``context``: itself for the first ``max_contexts`` seen, else ``_other``."""
        with self._lock:
            if context in self._contexts:
                return context
            if len(self._contexts) < self.max_contexts:
                self._contexts.add(context)
                return context
        return OTHER_CONTEXT
