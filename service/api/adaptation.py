"""Target and adaptation RPCs: ListTargets, TriggerAdaptation, GetAdaptation, ListAdaptations."""
from __future__ import annotations

import grpc

from proto import receiver_pb2 as pb
from service.adaptation.worker import AdaptationError, AdaptationWorker
from service.api.base import RpcBase
from service.api.requests import RequestError, invalid, not_found


def job_message(job) -> pb.AdaptationJob:
    return pb.AdaptationJob(
        job_id=job.job_id, state=pb.AdaptationJob.State.Value(job.state), method=job.method,
        context=job.context, progress=job.progress, ber_before=job.ber_before, ber_after=job.ber_after,
        new_version=job.new_version, message=job.message, regression_ber_before=job.regression_ber_before,
        regression_ber_after=job.regression_ber_after, selected_summary=job.selected_summary,
        rolled_back=job.rolled_back, scope=job.scope, stage=job.stage, stage_seconds=job.stage_seconds)


def _version_name(version) -> str:
    return version.version if version is not None else ""


class AdaptationRpcs(RpcBase):
    def ListTargets(self, request, context) -> pb.ListTargetsResponse:
        rows = []
        routing = self.registry.routing
        for name, window in self.monitor.windows().items():
            genie = window.genie_ber
            estimate = self.monitor.estimate(name)
            rows.append(pb.Target(context=name, ber=window.ber, genie_ber=-1.0 if genie is None else genie,
                                  slots=window.slots, is_target=self.target_rule.is_target(window),
                                  estimated_ber=-1.0 if estimate is None else estimate.expected_ber,
                                  pilot_sinr_db=estimate.pilot_sinr_db if estimate else float("nan"),
                                  serving_version=_version_name(routing.version_for(name))))
        rows.sort(key=lambda t: (not t.is_target, -t.ber))
        self.metrics.targets.set(sum(t.is_target for t in rows))
        self._ok("ListTargets")
        return pb.ListTargetsResponse(contexts=rows)

    def _require_worker(self) -> AdaptationWorker:
        if self.worker is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, "adaptation needs sample capture enabled")
        return self.worker

    def TriggerAdaptation(self, request: pb.AdaptationRequest, context) -> pb.AdaptationJob:
        try:
            job = self._require_worker().submit(request.context, list(request.slot_ids), request.method,
                                                dict(request.options), request.global_update)
        except AdaptationError as err:
            self._reject("TriggerAdaptation", invalid(str(err)), context)
        except RequestError as err:
            self._reject("TriggerAdaptation", err, context)
        self._ok("TriggerAdaptation")
        return job_message(job)

    def GetAdaptation(self, request: pb.GetAdaptationRequest, context) -> pb.AdaptationJob:
        try:
            job = self._require_worker().get(request.job_id)
            if job is None:
                raise not_found(f"job_id: '{request.job_id}' is unknown")
        except RequestError as err:
            self._reject("GetAdaptation", err, context)
        self._ok("GetAdaptation")
        return job_message(job)

    def ListAdaptations(self, request, context) -> pb.ListAdaptationsResponse:
        try:
            jobs = self._require_worker().jobs()
        except RequestError as err:
            self._reject("ListAdaptations", err, context)
        self._ok("ListAdaptations")
        return pb.ListAdaptationsResponse(jobs=[job_message(j) for j in jobs])
