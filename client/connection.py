"""How the client reaches the receiver service: plaintext or TLS (optionally with a client
certificate), and the admin token sent as ``authorization: Bearer <token>`` on every call. An
:class:`Endpoint` holds all of it; its blocking channel adds the token itself, so the CLI's unary
calls need not know about either, and ``client/stream.py`` opens an asyncio channel from the same
endpoint and sends its :attr:`Endpoint.metadata` with each stream."""
from __future__ import annotations

import asyncio
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path

import grpc

try:  # grpc.aio's internals, for keep_the_servers_status_when_a_write_fails
    from grpc import _common
    from grpc._cython import cygrpc
    from grpc.aio import _call
except ImportError:  # a grpcio laid out otherwise is left as it is
    _call = None

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, details: grpc.ClientCallDetails, metadata: list[tuple[str, str]]):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = details.compression


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                  grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds ``metadata`` (the endpoint's token header) to every call, whatever its shape."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]):
        self._metadata = metadata

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _ClientCallDetails(details, [*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


@dataclass(frozen=True)
class Endpoint:
    """Where the service listens and how to reach it: ``tls_ca`` (PEM) turns TLS on and is the CA the
    server's certificate must chain to; ``tls_cert`` and ``tls_key`` are the client's own certificate for
    mutual TLS; ``token``, when given, goes with every call. Unary calls use a channel from
    :meth:`connect`; streaming (``client.stream``) opens an asyncio channel to the same endpoint."""

    server: str
    token: str = ""
    tls_ca: str | Path | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a client certificate needs its key: give both --tls-cert and --tls-key")
        if self.tls_cert is not None and self.tls_ca is None:
            raise ValueError("a client certificate is for TLS: give --tls-ca (the CA of the server's certificate) too")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def _credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls_ca is None:
            return None
        return grpc.ssl_channel_credentials(Path(self.tls_ca).read_bytes(),
                                            Path(self.tls_key).read_bytes() if self.tls_key else None,
                                            Path(self.tls_cert).read_bytes() if self.tls_cert else None)

    def connect(self, wait_s: float = 30.0) -> grpc.Channel:
        """A channel once the service answers (a service that is still starting gets ``wait_s``)."""
        credentials = self._credentials()
        if credentials is None:
            channel = grpc.insecure_channel(self.server, options=_OPTIONS)
        else:
            channel = grpc.secure_channel(self.server, credentials, options=_OPTIONS)
        try:
            grpc.channel_ready_future(channel).result(timeout=wait_s)
        except grpc.FutureTimeoutError:
            channel.close()
            hint = "does its certificate chain to --tls-ca and name this host?" if self.tls_ca else "if it serves TLS: --tls-ca"
            raise ConnectionError(f"no receiver service answered at {self.server} within {wait_s:g} s ({hint})") from None
        return grpc.intercept_channel(channel, BearerToken(self.metadata)) if self.token else channel

    def aio_channel(self) -> grpc.aio.Channel:
        """An asyncio channel of the running event loop (callers send :attr:`metadata` with each call)."""
        keep_the_servers_status_when_a_write_fails()
        credentials = self._credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(self.server, options=_OPTIONS)
        return grpc.aio.secure_channel(self.server, credentials, options=_OPTIONS)


def connect(server: str, wait_s: float = 30.0, token: str = "", tls_ca: str | Path | None = None,
            tls_cert: str | Path | None = None, tls_key: str | Path | None = None) -> grpc.Channel:
    """``Endpoint(server, token, tls_ca, tls_cert, tls_key).connect(wait_s)``."""
    return Endpoint(server, token, tls_ca, tls_cert, tls_key).connect(wait_s)


# How long a write that failed because the call ended waits for the status the server sent. Core
# delivers it within milliseconds; the wait only runs out where Core will send none (a batch it refused
# outright), and then the write reports INTERNAL as grpc.aio itself does.
_STATUS_WAIT_S = 5.0


async def _write_keeping_the_servers_status(self: _call._StreamRequestMixin, request) -> None:
    """``grpc.aio``'s ``_StreamRequestMixin._write`` (grpcio 1.85), but a write that fails because the
    server has just ended the call raises the server's status instead of overwriting it with INTERNAL."""
    if self.done():
        raise asyncio.InvalidStateError(_call._RPC_ALREADY_FINISHED_DETAILS)
    if self._done_writing_flag:
        raise asyncio.InvalidStateError(_call._RPC_HALF_CLOSED_DETAILS)
    if not self._metadata_sent.is_set():
        await self._metadata_sent.wait()
        if self.done():
            await self._raise_for_status()
    serialized_request = _common.serialize(request, self._request_serializer)
    try:
        await self._cython_call.send_serialized_message(serialized_request)
    except cygrpc.InternalError as err:
        try:
            await asyncio.wait_for(asyncio.shield(self._cython_call.status()), _STATUS_WAIT_S)
        except TimeoutError:
            self._cython_call.set_internal_error(str(err))
        await self._raise_for_status()
    except asyncio.CancelledError:
        if not self.cancelled():
            self.cancel()
        raise


@functools.cache
def keep_the_servers_status_when_a_write_fails() -> None:
    """Make ``grpc.aio`` streams report the status the server ended them with when a write fails at the
    same moment. Without it a stream the service ends with RESOURCE_EXHAUSTED under load (its queue is
    full) fails with ``INTERNAL: Internal error from Core`` in about half the runs: grpc.aio overwrites
    the status it already holds when the client's next write fails (grpc/grpc#36066; the fix proposed
    upstream, grpc/grpc#43486, does what this does). The synchronous API reports the server's status.
    Checked once per process, when the client opens its first asyncio channel, and installed only over
    the grpc.aio code it was written against: a grpcio whose ``_write`` no longer sets an internal
    error, or lacks what the replacement uses, keeps its own."""
    if _call is None or not hasattr(_call, "_StreamRequestMixin"):
        return
    mixin = _call._StreamRequestMixin
    try:
        source = inspect.getsource(mixin._write)
    except (OSError, TypeError):  # no source to check: leave grpc as it is
        return
    uses = (hasattr(_call, "_RPC_ALREADY_FINISHED_DETAILS") and hasattr(_call, "_RPC_HALF_CLOSED_DETAILS")
            and hasattr(_common, "serialize") and hasattr(cygrpc, "InternalError"))
    if uses and "set_internal_error" in source and "send_serialized_message" in source:
        mixin._write = _write_keeping_the_servers_status
