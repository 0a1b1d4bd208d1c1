"""A channel to the receiver service: plaintext or TLS (optionally with a client certificate), and the
admin token sent as ``authorization: Bearer <token>`` on every call, so that callers of the stubs
(``client/stream.py``, the CLI) need not know about either."""
from __future__ import annotations

from pathlib import Path

import grpc

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


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
    """Adds the admin token to the metadata of every call, whatever its shape."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _ClientCallDetails(details, [*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


def connect(server: str, wait_s: float = 30.0, token: str = "", tls_ca: str | Path | None = None,
            tls_cert: str | Path | None = None, tls_key: str | Path | None = None) -> grpc.Channel:
    """A channel to ``server`` once it answers (a service that is still starting gets ``wait_s``).

    ``tls_ca`` (PEM) turns TLS on and is the CA the server's certificate must chain to; ``tls_cert`` and
    ``tls_key`` are the client's own certificate for mutual TLS. ``token``, when given, goes with every call.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs its key: give both --tls-cert and --tls-key")
    if tls_cert is not None and tls_ca is None:
        raise ValueError("a client certificate is for TLS: give --tls-ca (the CA of the server's certificate) too")
    options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    if tls_ca is None:
        channel = grpc.insecure_channel(server, options=options)
    else:
        credentials = grpc.ssl_channel_credentials(
            Path(tls_ca).read_bytes(), Path(tls_key).read_bytes() if tls_key else None,
            Path(tls_cert).read_bytes() if tls_cert else None)
        channel = grpc.secure_channel(server, credentials, options=options)
    try:
        grpc.channel_ready_future(channel).result(timeout=wait_s)
    except grpc.FutureTimeoutError:
        channel.close()
        hint = "does its certificate chain to --tls-ca and name this host?" if tls_ca else "if it serves TLS: --tls-ca"
        raise ConnectionError(f"no receiver service answered at {server} within {wait_s:g} s ({hint})") from None
    return grpc.intercept_channel(channel, BearerToken(token)) if token else channel
