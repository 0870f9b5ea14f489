"""The Kubernetes manifests render, validate against real schemas, and match the code.

Core kinds: kubernetes-validate --strict. KubeRay kinds: jsonschema against the CRDs in
../shared/kuberay-crds with unknown fields refused (kubernetes-validate passes custom resources
silently). serveConfigV2: Ray's ServeDeploySchema, and equal to what the code generates.
Prometheus: promtool check config / rules and the rule unit tests.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
CRDS = ROOT.parent / "shared" / "kuberay-crds"
OVERLAYS = ["cpu-dev", "gpu-prod"]
KUBERAY_KINDS = {"RayService": "ray.io_rayservices.yaml", "RayJob": "ray.io_rayjobs.yaml",
                 "RayCluster": "ray.io_rayclusters.yaml"}


def render(target: Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(target)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def _strict(schema):
    """Refuse unknown fields wherever the CRD lists properties (as the API server's strict mode)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if schema.get("type") == "object" and "properties" in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema.setdefault("additionalProperties", False)
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRDS / KUBERAY_KINDS[kind]).read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft7Validator(_strict(schema))


def kubernetes_validate(documents: list[dict], tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "core.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    return subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", str(path)],
                          capture_output=True, text=True, timeout=300)


def serve_configs(documents: list[dict]) -> list[dict]:
    return [yaml.safe_load(d["spec"]["serveConfigV2"]) for d in documents if d["kind"] == "RayService"]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request):
    return request.param, render(K8S / "overlays" / request.param)


def test_overlays_render_the_expected_objects(overlay):
    name, documents = overlay
    kinds = sorted(d["kind"] for d in documents)
    assert {"RayService", "RayJob", "RayCluster", "Secret"} <= set(kinds) and kinds.count("ConfigMap") == 3
    assert all(d["metadata"].get("namespace") for d in documents)


def test_core_kinds_pass_kubernetes_validate_strict(overlay, tmp_path):
    _, documents = overlay
    core = [d for d in documents if d["kind"] not in KUBERAY_KINDS]
    result = kubernetes_validate(core, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_kuberay_kinds_validate_against_the_crds(overlay):
    _, documents = overlay
    checked = 0
    for document in documents:
        if document["kind"] in KUBERAY_KINDS:
            errors = sorted(crd_validator(document["kind"]).iter_errors(document), key=str)
            assert not errors, [f"{list(e.path)}: {e.message}" for e in errors[:5]]
            checked += 1
    assert checked == 3


def test_serve_config_is_valid_and_generated_from_the_code(overlay):
    from ray.serve.schema import ServeDeploySchema

    from lorafleet.serve import app as serve_app
    from lorafleet.serve.cli import serve_config
    from lorafleet.serve.settings import load_settings

    name, documents = overlay
    [config] = serve_configs(documents)
    schema = ServeDeploySchema.model_validate(config)
    application = schema.applications[0]
    module, attribute = application.import_path.split(":")
    assert module == serve_app.__name__ and callable(getattr(serve_app, attribute))
    assert {d.name for d in application.deployments} == {serve_app.GATEWAY_NAME, serve_app.GENERATOR_NAME}
    assert config == serve_config(load_settings(K8S / "overlays" / name / "serve.yaml")), \
        "regenerate with: python scripts/k8s_sync_serve_config.py"
    assert getattr(serve_app, attribute)(application.args) is not None  # the builder accepts the args


def test_gpu_prod_requests_gpus_and_autoscales():
    documents = render(K8S / "overlays" / "gpu-prod")
    service = next(d for d in documents if d["kind"] == "RayService")
    [group] = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" and group["maxReplicas"] > group["minReplicas"]
    assert service["spec"]["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    generator = serve_configs(documents)[0]["applications"][0]["deployments"][1]
    assert generator["autoscaling_config"]["max_replicas"] == 8
    assert generator["ray_actor_options"]["num_gpus"] == 1.0
    settings = next(d for d in documents if d["metadata"]["name"] == "lorafleet-settings")
    assert settings["data"]["LORAFLEET_REGISTRY"].startswith("s3://")
    assert serve_configs(documents)[0]["applications"][0]["args"]["auth_enabled"] is True


def test_rayjob_trains_from_the_configmap_and_cleans_up():
    for name in OVERLAYS:
        job = next(d for d in render(K8S / "overlays" / name) if d["kind"] == "RayJob")
        assert job["spec"]["entrypoint"].startswith("lorafleet train /config/train.yaml")
        assert job["spec"]["shutdownAfterJobFinishes"] is True and job["spec"]["ttlSecondsAfterFinished"] > 0
        assert job["spec"]["activeDeadlineSeconds"] > 0
    from lorafleet.training.config import load_train_config

    assert load_train_config(K8S / "base" / "train.yaml").method.value == "lora"


def test_readiness_is_tied_to_readyz():
    service = next(d for d in render(K8S / "base") if d["kind"] == "RayService")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}


class TestBrokenManifestsFailEachValidator:
    def test_kubernetes_validate_refuses_an_unknown_field(self, tmp_path):
        broken = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"a": "b"},
                  "surprise": True}
        assert kubernetes_validate([broken], tmp_path).returncode != 0

    def test_crd_schema_refuses_an_unknown_field_and_a_wrong_type(self):
        service = next(d for d in render(K8S / "base") if d["kind"] == "RayService")
        unknown = copy.deepcopy(service)
        unknown["spec"]["rayClusterConfig"]["headGroupSpec"]["bogus"] = 1
        assert list(crd_validator("RayService").iter_errors(unknown))
        wrong = copy.deepcopy(service)
        wrong["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "many"
        assert list(crd_validator("RayService").iter_errors(wrong))

    def test_serve_deploy_schema_refuses_a_bad_config(self):
        from pydantic import ValidationError
        from ray.serve.schema import ServeDeploySchema

        [config] = serve_configs(render(K8S / "base"))
        config["applications"][0]["deployments"][1]["max_ongoing_requests"] = "lots"
        with pytest.raises(ValidationError):
            ServeDeploySchema.model_validate(config)

    def test_drift_from_the_code_is_caught(self):
        from lorafleet.serve.cli import serve_config
        from lorafleet.serve.settings import load_settings

        [config] = serve_configs(render(K8S / "base"))
        config["applications"][0]["import_path"] = "lorafleet.serve.app:old_builder"
        assert config != serve_config(load_settings(K8S / "base" / "serve.yaml"))


PROMETHEUS = K8S / "base" / "prometheus"


def test_prometheus_config_and_rules_pass_promtool():
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by scripts/setup.sh (Debian package prometheus)"
    for command in (["check", "config", "prometheus.yaml"], ["check", "rules", "alerts.yaml"],
                    ["test", "rules", "alerts-test.yaml"]):
        result = subprocess.run([promtool, *command], cwd=PROMETHEUS, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_reference_metrics_the_service_exports():
    from lorafleet.serve.metrics import ServiceMetrics

    exported = ServiceMetrics().exposition().decode()
    rules = yaml.safe_load((PROMETHEUS / "alerts.yaml").read_text())["groups"][0]["rules"]
    for rule in rules:
        names = set(re.findall(r"lorafleet_[a-z_]+", rule["expr"]))
        assert names
        for name in names:
            family = name.removesuffix("_bucket").removesuffix("_total")
            assert family in exported, f"{rule['alert']} uses {name}, which lorafleet does not export"


def _pod_templates(documents: list[dict]) -> dict[str, dict]:
    """Every pod template of the Ray kinds, by where it is."""
    templates = {}
    for document in documents:
        spec = document.get("spec") or {}
        cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec") or (
            spec if document["kind"] == "RayCluster" else None)
        if cluster is None:
            continue
        kind = document["kind"]
        templates[f"{kind}/head"] = cluster["headGroupSpec"]["template"]
        for group in cluster.get("workerGroupSpecs", []):
            templates[f"{kind}/worker-{group['groupName']}"] = group["template"]
        if "submitterPodTemplate" in spec:
            templates[f"{kind}/submitter"] = spec["submitterPodTemplate"]
    return templates


def _env_names(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_refs(container: dict) -> set[str]:
    refs = {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}
    refs |= {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
             if "secretKeyRef" in e.get("valueFrom", {})}
    return refs


def test_every_pod_is_hardened_and_uses_ray_token_auth(overlay):
    _, documents = overlay
    templates = _pod_templates(documents)
    assert {"RayService/head", "RayJob/head", "RayJob/submitter", "RayCluster/head"} <= set(templates)
    assert any(k.startswith("RayService/worker-") for k in templates)
    for where, template in templates.items():
        pod = template["spec"]
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        mounted = set()
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True, where
            assert context["capabilities"]["drop"] == ["ALL"] and context["runAsNonRoot"] is True, where
            env = _env_names(container)
            assert env["RAY_AUTH_MODE"]["value"] == "token", where
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "lorafleet-ray-auth", where
            mounted |= {m["mountPath"] for m in container.get("volumeMounts", [])}
        assert "/tmp" in mounted, f"{where}: a read-only root needs a writable /tmp (Ray's session dir)"


def test_every_serve_pod_starts_ray_with_the_serve_configs_ingress(overlay):
    from lorafleet.serve.ingress import ray_serve_environment
    from lorafleet.serve.settings import ServeSettings

    _, documents = overlay
    [config] = serve_configs(documents)
    settings = ServeSettings(**config["applications"][0]["args"])
    wanted = ray_serve_environment(settings.ingress, settings.ingress_drain_s)
    serve_pods = {where: t for where, t in _pod_templates(documents).items() if where.startswith("RayService/")}
    assert len(serve_pods) >= 2, serve_pods.keys()
    for where, template in serve_pods.items():
        for container in template["spec"]["containers"]:
            env = {name: entry.get("value") for name, entry in _env_names(container).items()}
            assert {name: env.get(name) for name in wanted} == wanted, where


def test_each_pod_gets_only_the_secrets_it_uses(overlay):
    _, documents = overlay
    secrets = {d["metadata"]["name"] for d in documents if d["kind"] == "Secret"}
    assert secrets == {"lorafleet-storage", "lorafleet-api-tokens", "lorafleet-ray-auth"}
    for where, template in _pod_templates(documents).items():
        refs = set().union(*(_secret_refs(c) for c in template["spec"]["containers"]))
        if where.startswith(("RayJob/", "RayCluster/")):
            assert "lorafleet-api-tokens" not in refs, f"{where}: training pods must not see the API tokens"
        if where == "RayJob/submitter":
            assert refs == {"lorafleet-ray-auth"}, where
        if where.startswith("RayService/"):
            assert {"lorafleet-storage", "lorafleet-api-tokens", "lorafleet-ray-auth"} <= refs, where


def _labels(template: dict) -> dict:
    return template.get("metadata", {}).get("labels", {})


def test_network_policies_admit_the_serve_port_from_the_ingress_and_ray_ports_from_the_cluster(overlay):
    _, documents = overlay
    policies = {d["metadata"]["name"]: d["spec"] for d in documents if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"lorafleet-serve", "lorafleet-train"}
    templates = _pod_templates(documents)
    serve_pods = policies["lorafleet-serve"]["podSelector"]["matchLabels"]
    for name, component in (("lorafleet-serve", "RayService"), ("lorafleet-train", "RayJob"),
                            ("lorafleet-train", "RayCluster")):
        policy = policies[name]
        selector = policy["podSelector"]["matchLabels"]
        for where, template in templates.items():  # the policy selects every pod of its cluster
            if where.startswith(component):
                assert selector.items() <= _labels(template).items(), where
        assert policy["policyTypes"] == ["Ingress"]
        for rule in policy["ingress"]:
            from_namespaces = any("namespaceSelector" in peer for peer in rule["from"])
            if from_namespaces:  # from outside the cluster: the Serve port only
                assert name == "lorafleet-serve" and rule["ports"] == [{"protocol": "TCP", "port": 8000}]
            elif "ports" in rule:  # the training job server, from the serving gateway only
                assert name == "lorafleet-train" and rule["ports"] == [{"protocol": "TCP", "port": 8265}]
                assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [serve_pods]
            else:  # every port, but only from the same cluster's pods
                assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [selector]
    serve_selector = policies["lorafleet-serve"]["podSelector"]["matchLabels"]
    train_selector = policies["lorafleet-train"]["podSelector"]["matchLabels"]
    assert serve_selector != train_selector  # training pods cannot reach the serving cluster's Ray ports


def test_placeholder_secrets_would_be_refused_by_the_server():
    """The shipped API-token placeholders are refused at start-up: nobody deploys them by accident."""
    from lorafleet.serve.errors import RequestInvalid
    from lorafleet.serve.settings import load_settings

    line = (K8S / "base" / "secrets-api-tokens.env").read_text().split("LORAFLEET_API_TOKENS=", 1)[1].strip()
    with pytest.raises(RequestInvalid, match="REPLACE_ME"):
        load_settings(api_tokens=line)
