"""deploy/: Kubernetes manifests valid against the Kubernetes schemas, and consistent with the
Dockerfile, the Kong config and the app (probe paths, settings, ports, users)."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from billfold.app import create_app
from billfold.config import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
# The oldest Kubernetes minor release the manifests must work on.
K8S_VERSION = "1.29"


def load(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.fixture(scope="module")
def resources() -> dict[tuple[str, str], dict[str, Any]]:
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for path in MANIFESTS:
        for doc in load(path):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in out, f"duplicate {key}"
            out[key] = doc
    return out


@pytest.fixture(scope="module")
def app_paths(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    settings = Settings(
        database_url="postgresql://x@127.0.0.1/x",
        redis_url="redis://127.0.0.1:1/0",
        secret_key=base64.b64encode(b"\0" * 32).decode(),
        data_dir=tmp_path_factory.mktemp("deploy-app"),
    )
    return set(create_app(settings).openapi()["paths"])


def test_there_are_manifests() -> None:
    assert DEPLOY.joinpath("kubernetes", "api.yaml") in MANIFESTS


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_match_the_kubernetes_schema(path: Path) -> None:
    for doc in load(path):
        # strict: unknown fields (typos) fail too. JSON round trip: YAML anchors become copies.
        kubernetes_validate.validate(json.loads(json.dumps(doc)), K8S_VERSION, strict=True)


def test_api_deployment(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = resources[("Deployment", "billfold-api")]
    spec = deployment["spec"]
    assert "replicas" not in spec, "the HPA owns the replica count"
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (api,) = pod["containers"]
    assert api["args"][0] == "serve"
    assert api["securityContext"]["allowPrivilegeEscalation"] is False
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port_names = {p["name"] for p in api["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert api[probe]["httpGet"]["port"] in port_names
    assert api["resources"]["requests"]["cpu"], "the HPA's CPU target needs a CPU request"
    mounts = {m["mountPath"] for m in api["volumeMounts"]}
    data_dir = next(e["value"] for e in api["env"] if e["name"] == "BILLFOLD_DATA_DIR")
    assert data_dir in mounts, "read-only root filesystem: the data dir must be a volume"


def test_probe_paths_exist_in_the_app(
    resources: dict[tuple[str, str], dict[str, Any]], app_paths: set[str]
) -> None:
    (api,) = resources[("Deployment", "billfold-api")]["spec"]["template"]["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert api[probe]["httpGet"]["path"] in app_paths


def test_env_names_are_settings(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    (api,) = resources[("Deployment", "billfold-api")]["spec"]["template"]["spec"]["containers"]
    fields = set(Settings.model_fields)
    for env in api["env"]:
        name = env["name"]
        assert name.startswith("BILLFOLD_"), name
        assert name.removeprefix("BILLFOLD_").lower() in fields, f"{name} is not a setting"
    names = {e["name"] for e in api["env"]}
    assert {"BILLFOLD_DATABASE_URL", "BILLFOLD_REDIS_URL", "BILLFOLD_SECRET_KEY"} <= names


def test_services_select_the_api_pods(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    pod = resources[("Deployment", "billfold-api")]["spec"]["template"]
    (api,) = pod["spec"]["containers"]
    port_names = {p["name"] for p in api["ports"]}
    services = [
        r
        for (kind, _), r in resources.items()
        if kind == "Service" and r["metadata"]["labels"]["app.kubernetes.io/component"] == "api"
    ]
    assert len(services) == 2
    for service in services:
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names


def test_every_service_selects_the_pods_of_exactly_one_deployment(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployments = [r for (kind, _), r in resources.items() if kind == "Deployment"]
    for (kind, name), service in resources.items():
        if kind != "Service":
            continue
        selector = service["spec"]["selector"].items()
        chosen = [
            d
            for d in deployments
            if selector <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(chosen) == 1, name
        ports = {
            p["name"]
            for c in chosen[0]["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, name


def _vault(resources: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    (vault,) = resources[("Deployment", "billfold-vault")]["spec"]["template"]["spec"]["containers"]
    return vault  # type: ignore[no-any-return]


def test_vault_deployment_runs_billfold_vault_with_mtls(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    deployment = resources[("Deployment", "billfold-vault")]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["securityContext"]["runAsNonRoot"] is True
    vault = _vault(resources)
    args = vault["args"]
    assert args[0] == "vault"
    assert vault["securityContext"]["allowPrivilegeEscalation"] is False
    assert vault["securityContext"]["readOnlyRootFilesystem"] is True
    # mTLS: a server certificate, and client certificates required from the CA given.
    options = dict(zip(args[1::2], args[2::2], strict=True))
    mounts = {m["mountPath"]: m["name"] for m in vault["volumeMounts"]}
    for option in ("--ssl-certfile", "--ssl-keyfile", "--ssl-ca-certs"):
        path = options[option]
        assert any(path.startswith(mount + "/") for mount in mounts), option
    ports = {p["name"]: p["containerPort"] for p in vault["ports"]}
    assert int(options["--port"]) in ports.values()
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert vault[probe]["tcpSocket"]["port"] in ports
    env = {e["name"]: e for e in vault["env"]}
    fields = set(Settings.model_fields)
    for name in env:
        assert name.removeprefix("BILLFOLD_").lower() in fields, f"{name} is not a setting"
    required = {"BILLFOLD_DATABASE_URL", "BILLFOLD_VAULT_SERVICE_KEY", "BILLFOLD_HSM_PIN"}
    assert required <= env.keys()
    assert env["BILLFOLD_VAULT_KEYSTORE"]["value"] == "pkcs11"
    assert env["BILLFOLD_DATA_DIR"]["value"] in mounts


def test_the_api_reaches_the_vault_service_over_mtls(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    (api,) = resources[("Deployment", "billfold-api")]["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in api["env"]}
    url = env["BILLFOLD_VAULT_URL"]["value"]
    m = re.fullmatch(r"https://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", url)
    assert m, url
    service = resources[("Service", m.group(1))]
    assert service["metadata"]["namespace"] == m.group(2)
    assert int(m.group(3)) in {p["port"] for p in service["spec"]["ports"]}
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "vault"
    # Both sides sign/verify with the same secret.
    vault_env = {e["name"]: e for e in _vault(resources)["env"]}
    assert (
        env["BILLFOLD_VAULT_SERVICE_KEY"]["valueFrom"]
        == vault_env["BILLFOLD_VAULT_SERVICE_KEY"]["valueFrom"]
    )
    mounts = [m["mountPath"] for m in api["volumeMounts"]]
    for name in ("CA", "CLIENT_CERT", "CLIENT_KEY"):
        path = env[f"BILLFOLD_VAULT_{name}_FILE"]["value"]
        assert any(path.startswith(mount + "/") for mount in mounts), name
    # Only API pods may open a connection to the vault pods.
    policy = resources[("NetworkPolicy", "billfold-vault")]
    assert policy["spec"]["podSelector"]["matchLabels"] == service["spec"]["selector"]
    (rule,) = policy["spec"]["ingress"]
    (source,) = rule["from"]
    assert source["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "api"


def test_hpa_and_pdb(resources: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = resources[("Deployment", "billfold-api")]
    hpa = resources[("HorizontalPodAutoscaler", "billfold-api")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = resources[("PodDisruptionBudget", "billfold-api")]
    assert pdb["apiVersion"] == "policy/v1"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # A node drain can always proceed: at least one pod may be evicted at the minimum scale.
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


def test_kong_targets_the_headless_service(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    kong = yaml.safe_load((DEPLOY / "kong" / "kong.yml").read_text())
    targets = [t["target"] for u in kong["upstreams"] for t in u["targets"]]
    assert targets
    for target in targets:
        host, _, port = target.rpartition(":")
        m = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local", host)
        assert m, target
        service = resources[("Service", m.group(1))]
        assert service["metadata"]["namespace"] == m.group(2)
        assert service["spec"]["clusterIP"] == "None", "Kong balances per pod: headless"
        assert int(port) in {p["port"] for p in service["spec"]["ports"]}


def test_dockerfile_matches_the_deployment(
    resources: dict[tuple[str, str], dict[str, Any]],
) -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) >= 2, "multi-stage"
    assert "uv sync --frozen" in dockerfile
    assert re.search(r'^ENTRYPOINT \["billfold"\]$', dockerfile, re.M)
    assert re.search(r'^CMD \["serve"', dockerfile, re.M)
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and not user[-1].startswith(("root", "0")), "the image runs unprivileged"
    uid = int(re.search(r"^ARG UID=(\d+)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    pod = resources[("Deployment", "billfold-api")]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == uid
    expose = {int(p) for p in re.findall(r"^EXPOSE (\d+)$", dockerfile, re.M)}
    (api,) = pod["containers"]
    assert {p["containerPort"] for p in api["ports"]} <= expose
    vault_pod = resources[("Deployment", "billfold-vault")]["spec"]["template"]["spec"]
    assert vault_pod["securityContext"]["runAsUser"] == uid
    assert {p["containerPort"] for p in _vault(resources)["ports"]} <= expose
