"""deploy/k8s, checked offline: every manifest against the Kubernetes API schema (kubernetes-validate's
bundled OpenAPI schemas, strict: unknown fields fail), and the wiring a schema cannot see: probes on
the gRPC port, the server TOML, leader and followers, the admin token, the shared registry."""
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from service.config import ServerConfig
from service.server import SERVICE_NAME
from service.serving.registry import ACTIVE_FILE

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.33"  # the oldest release these manifests target
MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
TEMPLATES = {"secret.yaml"}  # shapes to create by hand, kept out of kustomization.yaml


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


RESOURCES = [doc for path in MANIFESTS for doc in _documents(path)]


def _resource(kind: str, name: str) -> dict:
    [found] = [r for r in RESOURCES if r["kind"] == kind and r["metadata"]["name"] == name]
    return found


LEADER, FOLLOWERS = _resource("Deployment", "deeprx-leader"), _resource("Deployment", "deeprx")


def _pod(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]


def _container(deployment: dict) -> dict:
    [container] = _pod(deployment)["containers"]
    return container


def _option(container: dict, flag: str) -> str:
    words = container["command"] + container.get("args", [])
    return words[words.index(flag) + 1]


def _volume_at(deployment: dict, container: dict, path: str) -> dict:
    """The pod volume mounted at ``path`` (or at a parent of it) in ``container``."""
    [mount] = [m for m in container["volumeMounts"]
               if PurePosixPath(path).is_relative_to(m["mountPath"])]
    [volume] = [v for v in _pod(deployment)["volumes"] if v["name"] == mount["name"]]
    return volume


def _server_config(deployment: dict, tmp_path: Path) -> ServerConfig:
    """The ServerConfig this deployment's server reads: its --config file, from the ConfigMap mounted there."""
    container = _container(deployment)
    path = PurePosixPath(_option(container, "--config"))
    config_map = _resource("ConfigMap", _volume_at(deployment, container, str(path))["configMap"]["name"])
    toml = tmp_path / path.name
    toml.write_text(config_map["data"][path.name])
    return ServerConfig.from_toml(toml)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_validates_against_the_kubernetes_schema(path):
    for resource in _documents(path):
        assert kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION


def test_kustomization_applies_every_manifest_but_the_templates():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in MANIFESTS if p.name not in TEMPLATES)


@pytest.mark.parametrize("deployment", [LEADER, FOLLOWERS], ids=["leader", "followers"])
def test_probes_ask_the_grpc_health_service_on_the_grpc_port(deployment):
    container = _container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == int(_option(container, "--port")) == 50051
    assert ports["metrics"] == int(_option(container, "--metrics-port"))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME


@pytest.mark.parametrize("deployment", [LEADER, FOLLOWERS], ids=["leader", "followers"])
def test_config_parses_and_threads_match_the_cpu_limit(deployment, tmp_path):
    config = _server_config(deployment, tmp_path)
    container = _container(deployment)
    cpus = int(container["resources"]["limits"]["cpu"])
    assert config.batching.workers * config.inference.threads == int(_option(container, "--threads")) == cpus


def test_one_leader_publishes_and_the_followers_follow_its_service(tmp_path):
    leader, followers = _server_config(LEADER, tmp_path), _server_config(FOLLOWERS, tmp_path)
    assert LEADER["spec"]["replicas"] == 1 and LEADER["spec"]["strategy"]["type"] == "Recreate"
    assert leader.replication.publish and not leader.replication.follow
    assert followers.replication.follow and not followers.replication.publish
    host, port = followers.replication.follow.removeprefix("tcp://").split(":")
    service = _resource("Service", host)
    leader_labels = LEADER["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= leader_labels.items()
    [target] = [p["targetPort"] for p in service["spec"]["ports"] if p["port"] == int(port)]
    leader_ports = {p["name"]: p["containerPort"] for p in _container(LEADER)["ports"]}
    assert leader.replication.publish == f"tcp://0.0.0.0:{leader_ports[target]}"
    assert followers.models.max_scoped >= leader.models.max_scoped, "every scope the leader sets can be followed"
    assert not followers.capture.enabled, "followers do not adapt"


def test_the_serving_service_selects_the_followers_on_grpc_and_metrics():
    service = _resource("Service", "deeprx")
    assert service["spec"]["selector"].items() <= FOLLOWERS["spec"]["template"]["metadata"]["labels"].items()
    container_ports = {p["name"] for p in _container(FOLLOWERS)["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"grpc", "metrics"} <= container_ports


def test_every_replica_reads_the_admin_token_from_the_secret():
    secret = _resource("Secret", "deeprx-admin")
    for deployment in (LEADER, FOLLOWERS):
        [env] = [e for e in _container(deployment)["env"] if e["name"] == "DEEPRX_ADMIN_TOKEN"]
        reference = env["valueFrom"]["secretKeyRef"]
        assert reference["name"] == secret["metadata"]["name"] and reference["key"] in secret["stringData"]


def test_the_registry_is_one_shared_volume_and_followers_wait_for_its_first_version(tmp_path):
    claims = set()
    for deployment in (LEADER, FOLLOWERS):
        registry = _server_config(deployment, tmp_path).replication.registry
        claims.add(_volume_at(deployment, _container(deployment), registry)["persistentVolumeClaim"]["claimName"])
    [claim] = claims
    assert _resource("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]
    store = _volume_at(LEADER, _container(LEADER), _option(_container(LEADER), "--store"))
    assert _resource("PersistentVolumeClaim", store["persistentVolumeClaim"]["claimName"])
    [wait] = _pod(FOLLOWERS)["initContainers"]
    assert f"{_server_config(FOLLOWERS, tmp_path).replication.registry}/{ACTIVE_FILE}" in " ".join(wait["command"])
    assert "--model" not in _container(FOLLOWERS)["args"], "followers never import a model themselves"


@pytest.mark.parametrize("deployment", [LEADER, FOLLOWERS], ids=["leader", "followers"])
def test_containers_run_as_non_root_on_a_read_only_root_filesystem(deployment):
    pod = _pod(deployment)
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
    for container in pod["containers"] + pod.get("initContainers", []):
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] and not context["allowPrivilegeEscalation"], container["name"]
        assert container["resources"]["requests"] and container["resources"]["limits"], container["name"]
