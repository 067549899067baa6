"""deploy/kubernetes: every manifest valid (strict) against the Kubernetes API schemas that
kubernetes-validate bundles (no network), and the properties the README relies on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
from kubernetes_validate import utils as kv_utils

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
# Native sidecars (initContainers with restartPolicy: Always) need 1.29; grpc probes 1.27.
MIN_VERSION = "1.29.0"
VERSIONS = [MIN_VERSION, kv_utils.latest_version()]
NAMESPACE = "mail"
POLICY_PORT = 50051

Resource = dict[str, Any]


def load_all() -> list[tuple[str, Resource]]:
    found = [
        (path.name, resource)
        for path in sorted(MANIFESTS.glob("*.yaml"))
        for resource in kv_utils.resources_from_file(str(path))
        if resource
    ]
    assert found, f"no manifests in {MANIFESTS}"
    return found


RESOURCES = load_all()


def find(kind: str, name: str) -> Resource:
    (match,) = [r for _, r in RESOURCES if r["kind"] == kind and r["metadata"]["name"] == name]
    return match


def pod_spec(deployment: Resource) -> Resource:
    spec: Resource = deployment["spec"]["template"]["spec"]
    return spec


def test_the_folder_has_its_readme_and_only_yaml_manifests() -> None:
    assert (MANIFESTS / "README.md").is_file()
    others = {p.name for p in MANIFESTS.iterdir()} - {"README.md"}
    assert others == {p.name for p in MANIFESTS.glob("*.yaml")}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    ("file", "resource"),
    RESOURCES,
    ids=[f"{f}:{r['kind']}/{r['metadata']['name']}" for f, r in RESOURCES],
)
def test_manifest_is_valid(file: str, resource: Resource, version: str) -> None:
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        pytest.fail(f"{file}: {exc.message} at {'.'.join(map(str, exc.path))}")
    if resource["kind"] != "Namespace":
        assert resource["metadata"]["namespace"] == NAMESPACE


def test_policy_deployment_has_replicas_probes_and_resources() -> None:
    deployment = find("Deployment", "policy")
    assert deployment["spec"]["replicas"] >= 2
    (container,) = pod_spec(deployment)["containers"]
    assert container["image"] == "ghcr.io/example/milter-policy:latest"
    assert [p["containerPort"] for p in container["ports"]] == [POLICY_PORT]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": POLICY_PORT}, probe
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    # Longer than policy.serve()'s shutdown grace of 30 s.
    assert pod_spec(deployment)["terminationGracePeriodSeconds"] > 30


def test_policy_service_is_headless_and_selects_the_policy_pods() -> None:
    service = find("Service", "policy")
    assert service["spec"]["clusterIP"] == "None"
    assert [p["port"] for p in service["spec"]["ports"]] == [POLICY_PORT]
    labels = find("Deployment", "policy")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    budget = find("PodDisruptionBudget", "policy")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()


def bridge_sidecar() -> Resource:
    spec = pod_spec(find("Deployment", "mta"))
    containers: list[Resource] = [*spec.get("initContainers", []), *spec["containers"]]
    (bridge,) = [c for c in containers if "milter-bridge" in c["image"]]
    return bridge


def test_bridge_is_a_native_sidecar_next_to_the_mta() -> None:
    spec = pod_spec(find("Deployment", "mta"))
    assert bridge_sidecar() in spec["initContainers"]
    assert bridge_sidecar()["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["postfix"]


def test_sidecar_resolves_every_policy_pod_and_listens_on_loopback() -> None:
    args = bridge_sidecar()["args"]
    upstream = args[args.index("--upstream") + 1]
    assert upstream.startswith("dns:///"), "dns:/// makes grpc resolve every pod's address"
    assert upstream == f"dns:///policy.{NAMESPACE}.svc.cluster.local:{POLICY_PORT}"
    listen = args[args.index("--listen") + 1]
    assert listen.startswith("inet:127.0.0.1:")
    port = listen.rsplit(":", 1)[1]
    env = {e["name"]: e["value"] for e in bridge_sidecar()["env"]}
    assert env["MILTER_BRIDGE_PORT"] == port
    for probe in ("startupProbe", "livenessProbe"):
        command = bridge_sidecar()[probe]["exec"]["command"]
        assert command == ["milter-bridge", "probe", "--connect", listen], probe
    grace = float(args[args.index("--grace-period") + 1])
    assert pod_spec(find("Deployment", "mta"))["terminationGracePeriodSeconds"] > grace


def test_sidecar_exposes_its_metrics_port() -> None:
    args = bridge_sidecar()["args"]
    metrics = args[args.index("--metrics-listen") + 1]
    host, _, port = metrics.rpartition(":")
    assert host == "0.0.0.0", "Prometheus scrapes the pod IP, not loopback"
    ports = {p["name"]: p["containerPort"] for p in bridge_sidecar()["ports"]}
    assert ports["metrics"] == int(port)
