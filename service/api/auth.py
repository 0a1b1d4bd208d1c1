"""Who may call what: the admin bearer token and the server's TLS credentials.

The token check is a server interceptor, so one place covers every RPC: the state-changing ones
always, every other one (but the gRPC health check, which probes call without metadata) with
``security.protect_reads``. Tokens are compared in constant time and never logged.
"""
from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import grpc

from service.api.requests import RECEIVER, RequestError
from service.config import SecurityConfig
from service.serving.metrics import ServiceMetrics

log = logging.getLogger("deeprx.auth")

ADMIN_METHODS = frozenset({"ActivateModel", "ReleaseScope", "TriggerAdaptation"})
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})  # Kubernetes' grpc probe sends no metadata
_HANDLERS = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
             (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}


def check_token(metadata: Sequence[tuple[str, str]] | None, token: str) -> None:
    """Raise ``RequestError`` unless ``metadata`` carries ``authorization: Bearer <token>``."""
    header = dict(metadata or ()).get("authorization", "")
    scheme, _, given = header.partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        raise RequestError(grpc.StatusCode.UNAUTHENTICATED,
                           "this RPC needs the admin token: send metadata 'authorization: Bearer <token>' "
                           "(deeprx-client: --token or DEEPRX_ADMIN_TOKEN)")
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise RequestError(grpc.StatusCode.PERMISSION_DENIED, "the admin token is wrong")


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses protected RPCs without the right token, before the RPC body runs; a refusal is
    counted like the RPCs' own (``RpcBase._reject``)."""

    def __init__(self, security: SecurityConfig, metrics: ServiceMetrics):
        self._token = security.admin_token
        self._protect_reads = security.protect_reads
        self._metrics = metrics

    def _protected(self, service: str, method: str) -> bool:
        if service == RECEIVER and method in ADMIN_METHODS:
            return True
        return self._protect_reads and service not in OPEN_SERVICES

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler | None]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        service, _, method = details.method.lstrip("/").rpartition("/")
        if handler is None or not self._token or not self._protected(service, method):
            return handler
        try:
            check_token(details.invocation_metadata, self._token)
        except RequestError as err:
            self._metrics.requests.labels(method, "error").inc()
            self._metrics.rejected_requests.labels(err.code.name).inc()
            return _refusal(handler, err)
        return handler


def _refusal(handler: grpc.RpcMethodHandler, err: RequestError) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that ends the call with ``err`` and reads nothing."""

    async def refuse(request, context: grpc.aio.ServicerContext):  # noqa: ARG001 - the request is never read
        await context.abort(err.code, err.message)

    make = _HANDLERS[(handler.request_streaming, handler.response_streaming)]
    return make(refuse, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def check_security(security: SecurityConfig) -> grpc.ServerCredentials | None:
    """Refuse contradictory settings; return TLS credentials from the PEM files, or None for a plaintext port."""
    if security.protect_reads and not security.admin_token:
        raise ValueError("security.protect_reads needs an admin token (--admin-token, DEEPRX_ADMIN_TOKEN or "
                         "[security] admin_token)")
    if bool(security.tls_cert) != bool(security.tls_key):
        raise ValueError("security: tls_cert and tls_key go together (the server certificate and its private key)")
    if not security.tls_cert:
        if security.tls_client_ca:
            raise ValueError("security: tls_client_ca (mutual TLS) needs tls_cert and tls_key too")
        return None
    pair = (_read_pem(security.tls_key, "tls_key"), _read_pem(security.tls_cert, "tls_cert"))
    client_ca = _read_pem(security.tls_client_ca, "tls_client_ca") if security.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None and security.require_client_cert)


def _read_pem(path: str, key: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"security.{key}: cannot read '{path}': {err.strerror}") from None


def log_access(security: SecurityConfig) -> None:
    """One startup line saying what is protected and whether the port speaks TLS (never the token)."""
    if security.tls_cert:
        mutual = bool(security.tls_client_ca) and security.require_client_cert
        transport = "TLS, client certificates required" if mutual else "TLS"
    else:
        transport = "plaintext, no TLS"
    if not security.admin_token:
        log.warning("no admin token configured: ActivateModel, ReleaseScope and TriggerAdaptation are open to "
                    "every client (set --admin-token, DEEPRX_ADMIN_TOKEN or [security] admin_token); %s", transport)
    elif security.protect_reads:
        log.info("every RPC but the gRPC health check needs the admin token; %s", transport)
    else:
        log.info("admin RPCs (ActivateModel, ReleaseScope, TriggerAdaptation) need the admin token, "
                 "reads and inference are open; %s", transport)
