"""Admin token, protected reads, TLS and mutual TLS on real servers on 127.0.0.1, and that the
token never reaches a log line or /metrics."""
from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
from pathlib import Path
from typing import Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from client.cli import main as client_main
from client.connection import Endpoint, connect
from client.stream import report_feedback, slot_message, stream_slots
from proto import receiver_pb2 as pb
from proto import receiver_pb2_grpc as pb_grpc
from schema.dataset import read_slots
from service.api.auth import check_security, check_token
from service.api.requests import RequestError
from service.cli import build_parser, serve_config
from service.config import SecurityConfig, ServerConfig
from service.server import ReceiverServer
from tests.conftest import scrape

TOKEN = "tok-3f9a1c7e5b2d4f60a8e1"
RIGHT = (("authorization", f"Bearer {TOKEN}"),)
WRONG = (("authorization", "Bearer not-the-token"),)
NONE = ()
OK, UNAUTHENTICATED, PERMISSION_DENIED = (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED,
                                          grpc.StatusCode.PERMISSION_DENIED)
AUTH_CODES = (UNAUTHENTICATED, PERMISSION_DENIED)


def status(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return OK


@contextlib.contextmanager
def running(store: Path, model: Path, config: ServerConfig | None = None, **security) -> Iterator[ReceiverServer]:
    config = config or ServerConfig(port=0, metrics_port=0, security=SecurityConfig(**security))
    server = ReceiverServer(config, store, model).start()
    try:
        yield server
    finally:
        server.stop(grace=1)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_checkpoint) -> Iterator[ReceiverServer]:
    """A server with an admin token; reads open."""
    with running(tmp_path_factory.mktemp("guarded"), tiny_checkpoint, admin_token=TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def stub(guarded) -> Iterator[pb_grpc.ReceiverStub]:
    with grpc.insecure_channel(f"127.0.0.1:{guarded.port}") as channel:
        yield pb_grpc.ReceiverStub(channel)


@pytest.fixture(scope="module")
def slot(train_mix_file) -> pb.Slot:
    slots, _ = read_slots(train_mix_file)
    return slot_message(slots, 0, "sec-0", "cell-1")


# RPC -> (call with metadata, its own answer with the right token)
ADMIN_CALLS = {
    "ActivateModel": (lambda s, md: s.ActivateModel(pb.ActivateModelRequest(version="v1"), metadata=md, timeout=10),
                      OK),
    "ReleaseScope": (lambda s, md: s.ReleaseScope(pb.ReleaseScopeRequest(context="cell-1"), metadata=md, timeout=10),
                     OK),
    # no context and no slot ids: refused for the request itself, and no job runs
    "TriggerAdaptation": (lambda s, md: s.TriggerAdaptation(pb.AdaptationRequest(), metadata=md, timeout=10),
                          grpc.StatusCode.INVALID_ARGUMENT),
}


@pytest.mark.parametrize("method", sorted(ADMIN_CALLS))
@pytest.mark.parametrize("metadata, expected", [(NONE, UNAUTHENTICATED), (WRONG, PERMISSION_DENIED), (RIGHT, None)],
                         ids=["no-token", "wrong-token", "right-token"])
def test_admin_rpcs_need_the_token(stub, method, metadata, expected):
    call, own_answer = ADMIN_CALLS[method]
    assert status(lambda: call(stub, metadata)) == (expected or own_answer)


def test_refusals_are_counted_and_name_the_header(guarded, stub):
    with pytest.raises(grpc.RpcError) as refused:
        stub.ActivateModel(pb.ActivateModelRequest(version="v1"), timeout=10)
    assert "authorization: Bearer" in refused.value.details()
    text = scrape(guarded.metrics_port)
    assert 'deeprx_rejected_requests_total{code="UNAUTHENTICATED"}' in text
    assert 'deeprx_requests_total{method="ActivateModel",outcome="error"}' in text


def test_reads_and_inference_stay_open_by_default(guarded, stub, slot):
    assert status(lambda: stub.Detect(pb.DetectRequest(slots=[slot]), timeout=30)) == OK
    assert status(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=10)) == OK
    assert status(lambda: stub.GetModel(pb.GetModelRequest(), timeout=10)) == OK
    assert status(lambda: stub.ListTargets(pb.ListTargetsRequest(), timeout=10)) == OK
    assert status(lambda: stub.ListAdaptations(pb.ListAdaptationsRequest(), timeout=10)) == OK


def _reads(stub: pb_grpc.ReceiverStub, slot: pb.Slot, md) -> dict[str, Callable[[], object]]:
    """Every non-admin RPC of deeprx.v1.Receiver, and reflection."""
    return {
        "Detect": lambda: stub.Detect(pb.DetectRequest(slots=[slot]), metadata=md, timeout=30),
        "StreamDetect": lambda: list(stub.StreamDetect(iter([pb.StreamDetectRequest(slot=slot)]), metadata=md,
                                                       timeout=30)),
        "ReportFeedback": lambda: stub.ReportFeedback(pb.ReportFeedbackRequest(), metadata=md, timeout=10),
        "GetModel": lambda: stub.GetModel(pb.GetModelRequest(), metadata=md, timeout=10),
        "ListModels": lambda: stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=10),
        "ListTargets": lambda: stub.ListTargets(pb.ListTargetsRequest(), metadata=md, timeout=10),
        "GetAdaptation": lambda: stub.GetAdaptation(pb.GetAdaptationRequest(job_id="job-404"), metadata=md,
                                                    timeout=10),
        "ListAdaptations": lambda: stub.ListAdaptations(pb.ListAdaptationsRequest(), metadata=md, timeout=10),
    }


def test_protect_reads_closes_every_rpc_but_health(tmp_path, tiny_checkpoint, train_mix_file, slot):
    with running(tmp_path, tiny_checkpoint, admin_token=TOKEN, protect_reads=True) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ReceiverStub(channel)
        without = {name: status(call) for name, call in _reads(stub, slot, NONE).items()}
        assert without == dict.fromkeys(without, UNAUTHENTICATED)
        wrong = {name: status(call) for name, call in _reads(stub, slot, WRONG).items()}
        assert wrong == dict.fromkeys(wrong, PERMISSION_DENIED)
        right = {name: status(call) for name, call in _reads(stub, slot, RIGHT).items()}
        assert right == {**dict.fromkeys(right, OK), "GetAdaptation": grpc.StatusCode.NOT_FOUND}

        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        assert status(lambda: list(reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))) == UNAUTHENTICATED

        # the client's channel sends the token on streaming and unary calls alike
        slots, _ = read_slots(train_mix_file)
        endpoint = Endpoint(f"127.0.0.1:{server.port}", token=TOKEN)
        with endpoint.connect(10) as authed:
            report, _ = stream_slots(endpoint, slots.select(slice(0, 4)), context="cell-2")
            assert report.slots == 4
            assert report_feedback(authed, []).accepted == 0


def test_without_a_token_admin_rpcs_are_open_and_the_log_says_so(tmp_path, tiny_checkpoint, caplog):
    with caplog.at_level(logging.INFO), running(tmp_path, tiny_checkpoint) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ReceiverStub(channel)
        assert status(lambda: stub.ActivateModel(pb.ActivateModelRequest(version="v1"), timeout=10)) == OK
    assert any(r.levelno == logging.WARNING and "no admin token configured" in r.getMessage() for r in caplog.records)


def _serve_args(tmp_path: Path, model: Path, *extra: str):
    return build_parser().parse_args(["serve", "--store", str(tmp_path / "store"), "--model", str(model),
                                      "--port", "0", "--metrics-port", "0", *extra])


def test_token_precedence_flag_then_file_then_environment(tmp_path, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("DEEPRX_ADMIN_TOKEN", "from-env")
    assert serve_config(_serve_args(tmp_path, tiny_checkpoint)).security.admin_token == "from-env"
    toml = tmp_path / "server.toml"
    toml.write_text('[security]\nadmin_token = "from-file"\nprotect_reads = true\n')
    from_file = serve_config(_serve_args(tmp_path, tiny_checkpoint, "--config", str(toml)))
    assert (from_file.security.admin_token, from_file.security.protect_reads) == ("from-file", True)
    flag = _serve_args(tmp_path, tiny_checkpoint, "--config", str(toml), "--admin-token", "from-flag")
    assert serve_config(flag).security.admin_token == "from-flag"
    monkeypatch.delenv("DEEPRX_ADMIN_TOKEN")
    assert serve_config(_serve_args(tmp_path, tiny_checkpoint)).security.admin_token == ""


def test_serve_admin_token_flag_guards_activate_end_to_end(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """`deeprx-service serve --admin-token T`, driven by `deeprx-client activate` with and without it."""
    monkeypatch.delenv("DEEPRX_ADMIN_TOKEN", raising=False)
    config = serve_config(_serve_args(tmp_path, tiny_checkpoint, "--admin-token", TOKEN))
    with running(tmp_path / "store", tiny_checkpoint, config) as server:
        activate = ["activate", "--server", f"127.0.0.1:{server.port}", "--connect-timeout", "10", "--version", "v1"]
        assert client_main(activate) == 1
        assert "UNAUTHENTICATED" in capsys.readouterr().err
        assert client_main([*activate, "--token", "not-it"]) == 1
        assert "PERMISSION_DENIED" in capsys.readouterr().err
        assert client_main([*activate, "--token", TOKEN]) == 0
        monkeypatch.setenv("DEEPRX_ADMIN_TOKEN", TOKEN)  # the client's default
        assert client_main(activate) == 0
        assert "active model is now v1" in capsys.readouterr().out


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as PEM files
    ``<name>.pem`` and ``<name>.key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = tmp_path_factory.mktemp("pki")
    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(name: str, issuer=None, usage=None, names=()):
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"deeprx test {name}")])
        issuer_cert, issuer_key = issuer or (None, key)
        builder = (x509.CertificateBuilder().subject_name(subject)
                   .issuer_name(issuer_cert.subject if issuer_cert else subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        cert = builder.sign(issuer_key, hashes.SHA256())
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return cert, key

    ca = issue("ca")
    issue("server", ca, ExtendedKeyUsageOID.SERVER_AUTH,
          [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    issue("client", ca, ExtendedKeyUsageOID.CLIENT_AUTH)
    return folder


def test_detect_over_tls(tmp_path, tiny_checkpoint, pki, slot):
    with running(tmp_path, tiny_checkpoint, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key")) \
            as server:
        address = f"127.0.0.1:{server.port}"
        with connect(address, 10, tls_ca=pki / "ca.pem") as channel:
            response = pb_grpc.ReceiverStub(channel).Detect(pb.DetectRequest(slots=[slot]), timeout=30)
            assert [r.slot_id for r in response.results] == ["sec-0"]
        with pytest.raises(ConnectionError, match="if it serves TLS"):
            connect(address, 1)  # plaintext to a TLS port never gets ready


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path, tiny_checkpoint, pki, slot, train_mix_file):
    with running(tmp_path, tiny_checkpoint, tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"),
                 tls_client_ca=str(pki / "ca.pem")) as server:
        address = f"127.0.0.1:{server.port}"
        endpoint = Endpoint(address, tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem", tls_key=pki / "client.key")
        with endpoint.connect(10) as channel:
            response = pb_grpc.ReceiverStub(channel).Detect(pb.DetectRequest(slots=[slot]), timeout=30)
            assert len(response.results) == 1
        slots, _ = read_slots(train_mix_file, slice(0, 4))  # streaming opens its own (asyncio) channel
        assert stream_slots(endpoint, slots, context="mtls", streams=2)[0].slots == 4
        anonymous = grpc.secure_channel(address, grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes()))
        with anonymous:
            stub = pb_grpc.ReceiverStub(anonymous)
            assert status(lambda: stub.ListModels(pb.ListModelsRequest(), timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_the_token_is_never_logged_nor_exported(tmp_path, tiny_checkpoint, caplog):
    with caplog.at_level(logging.DEBUG), running(tmp_path, tiny_checkpoint, admin_token=TOKEN) as server, \
            grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.ReceiverStub(channel)
        for metadata in (NONE, WRONG, RIGHT):
            status(lambda: stub.ActivateModel(pb.ActivateModelRequest(version="v1"), metadata=metadata, timeout=10))
        text = scrape(server.metrics_port)
        assert 'code="PERMISSION_DENIED"' in text
        assert TOKEN not in text
        assert TOKEN not in repr(server.config)
    assert any("admin RPCs" in r.getMessage() and "need the admin token" in r.getMessage() for r in caplog.records)
    assert TOKEN not in caplog.text


def test_metrics_bind_to_loopback_unless_configured(tmp_path, tiny_checkpoint):
    assert ServerConfig().metrics_host == "127.0.0.1"
    config = ServerConfig(host="localhost", port=0, metrics_port=0)  # gRPC on another name: metrics stay put
    with running(tmp_path, tiny_checkpoint, config) as server:
        assert server._metrics_http.server_address[0] == "127.0.0.1"


@pytest.mark.parametrize("header, expected", [
    (None, UNAUTHENTICATED), ("Basic dXNlcjpwdw==", UNAUTHENTICATED), ("Bearer", UNAUTHENTICATED),
    ("Bearer wrong", PERMISSION_DENIED), (f"Bearer {TOKEN}x", PERMISSION_DENIED), (f"bearer {TOKEN}", None),
])
def test_check_token(header, expected):
    metadata = [("user-agent", "test")] + ([("authorization", header)] if header is not None else [])
    if expected is None:
        check_token(metadata, TOKEN)
        return
    with pytest.raises(RequestError) as refused:
        check_token(metadata, TOKEN)
    assert refused.value.code == expected and TOKEN not in refused.value.message


@pytest.mark.parametrize("security, message", [
    (SecurityConfig(protect_reads=True), "protect_reads needs an admin token"),
    (SecurityConfig(tls_cert="server.pem"), "tls_cert and tls_key go together"),
    (SecurityConfig(tls_client_ca="ca.pem"), "needs tls_cert and tls_key"),
    (SecurityConfig(tls_cert="/nonexistent/server.pem", tls_key="/nonexistent/server.key"),
     "security.tls_key: cannot read '/nonexistent/server.key'"),
])
def test_contradictory_security_settings_are_refused(security, message):
    with pytest.raises(ValueError, match=message):
        check_security(security)


def test_client_certificate_flags_need_each_other_and_a_ca():
    with pytest.raises(ValueError, match="both --tls-cert and --tls-key"):
        connect("127.0.0.1:1", 0.1, tls_ca="ca.pem", tls_cert="client.pem")
    with pytest.raises(ValueError, match="give --tls-ca"):
        connect("127.0.0.1:1", 0.1, tls_cert="client.pem", tls_key="client.key")
