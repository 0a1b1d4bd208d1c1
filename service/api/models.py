"""Model management RPCs over the registry: GetModel, ListModels, ActivateModel, ReleaseScope."""
from __future__ import annotations

import grpc

from proto import receiver_pb2 as pb
from service.api.base import RpcBase
from service.api.requests import RequestError, check_context, not_found
from service.serving.backend import BackendError
from service.serving.registry import ModelRegistry, ScopeLimitError, UnknownVersion


def model_info(registry: ModelRegistry, version: str) -> pb.ModelInfo:
    info = registry.info(version)
    active = registry.active
    return pb.ModelInfo(
        version=version, parent=info.get("parent", ""), creator=info.get("creator", ""),
        created=info.get("created", ""), size=str(info.get("size", "")), parameters=int(info.get("parameters", 0)),
        metrics={k: float(v) for k, v in info.get("metrics", {}).items() if isinstance(v, (int, float))},
        active=active is not None and active.version == version,
        scoped_contexts=sorted(c for c, v in registry.scopes().items() if v == version),
        adapted_for=info.get("adapted_for", ""),
    )


class ModelRpcs(RpcBase):
    def GetModel(self, request: pb.GetModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        try:
            version = request.version or self._serving_version(request.context)
            info = model_info(self.registry, version)
        except UnknownVersion:
            self._reject("GetModel", not_found(f"version: '{request.version}' is not in the registry"), context)
        except RequestError as err:
            self._reject("GetModel", err, context)
        self._ok("GetModel")
        return info

    def _serving_version(self, context_key: str) -> str:
        serving = self.registry.active_for(context_key) if context_key else self.registry.active
        if serving is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "no active model")
        return serving.version

    def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
        active = self.registry.active
        self._ok("ListModels")
        return pb.ListModelsResponse(models=[model_info(self.registry, v) for v in self.registry.versions()],
                                     active_version=active.version if active else "",
                                     scoped_versions=self.registry.scopes())

    def ActivateModel(self, request: pb.ActivateModelRequest, context: grpc.ServicerContext) -> pb.ModelInfo:
        try:
            if request.context:
                check_context(request.context, "context")
            if request.version not in self.registry.versions():
                raise not_found(f"version: '{request.version}' is not in the registry")
            current = self._active()
            candidate = self.registry.load(request.version)
            if candidate.model.config.rx != current.model.config.rx:
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"version: '{request.version}' expects {candidate.model.config.rx} receive "
                                   f"antennas, the active model {current.model.config.rx}")
            self.registry.activate(request.version, request.context or None)
        except BackendError as err:
            self._reject("ActivateModel", RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                                       f"version: '{request.version}' cannot be served: {err}"), context)
        except ScopeLimitError as err:
            self._reject("ActivateModel", RequestError(grpc.StatusCode.FAILED_PRECONDITION, f"context: {err}"), context)
        except RequestError as err:
            self._reject("ActivateModel", err, context)
        self._ok("ActivateModel")
        return model_info(self.registry, request.version)

    def ReleaseScope(self, request: pb.ReleaseScopeRequest, context: grpc.ServicerContext) -> pb.ReleaseScopeResponse:
        try:
            check_context(request.context, "context")
            released = self.registry.release(request.context)
            serving = self._serving_version(request.context)
        except RequestError as err:
            self._reject("ReleaseScope", err, context)
        self._ok("ReleaseScope")
        return pb.ReleaseScopeResponse(released=released, serving_version=serving)
