"""The Helm chart with a real helm: lint, render, schema, and Kubernetes' own JSON schemas.

Kubernetes versions: 1.29 (the chart's kubeVersion floor), 1.35 (the API version the pinned
Helm 4.1 is built against) and the newest schema kubernetes-validate bundles. Only the
optional ServiceMonitor (a prometheus-operator CRD) has no bundled schema; it is checked
by hand below.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import CHART, VARIANTS

K8S_VERSIONS = ("1.29.0", "1.35.0")
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def _latest_k8s() -> str:
    from kubernetes_validate.utils import latest_version

    return latest_version()


def test_every_main_variant_has_ci_values():
    assert set(VARIANTS) >= {"embedded-redis", "external-redis", "kubernetes-launcher-on",
                             "local-ray-dev", "gpu-cluster"}


def test_lint_strict(helm, variant):
    proc = subprocess.run([helm, "lint", "--strict", str(CHART), "-f",
                           str(CHART / "ci" / f"{variant}-values.yaml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[WARNING]" not in proc.stdout and "[ERROR]" not in proc.stdout


def test_kubernetes_validate_strict(rendered, variant, tmp_path):
    """`kubernetes-validate --strict` (the CLI) accepts every built-in object."""
    path = tmp_path / f"{variant}.yaml"
    path.write_text(rendered.text)
    versions = [*K8S_VERSIONS, _latest_k8s()]
    cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
    for v in versions:
        cmd += ["-k", v]
    proc = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    warned = [line for line in proc.stdout.splitlines() if line.startswith("WARN")]
    crds = [o for o in rendered.objects if (o["apiVersion"], o["kind"]) in CRD_KINDS]
    # One "no schema" warning per CRD object and version, nothing else.
    assert len(warned) == len(crds) * len(versions), proc.stdout
    assert all("ServiceMonitor" in line for line in warned)


def test_servicemonitor_shape(render):
    r = render(values_file="external-redis")
    sm = r.one("ServiceMonitor")
    svc = r.one("Service", "rm-ringmaster")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    # /metrics is a route of the REST port; Prometheus presents the API token.
    (endpoint,) = sm["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"], endpoint["scheme"]) == ("http", "/metrics",
                                                                        "http")
    assert "http" in {p["name"] for p in svc["spec"]["ports"]}
    token = _controller_env(r)["RINGMASTER_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": token}
    assert sm["metadata"]["labels"]["release"] == "prometheus"
    tls = render("--set", "serviceMonitor.enabled=true", "--set", "tls.enabled=true",
                 "--set", "tls.secretName=rm-cert").one("ServiceMonitor")["spec"]["endpoints"][0]
    assert tls["scheme"] == "https"
    assert tls["tlsConfig"]["ca"]["secret"] == {"name": "rm-cert", "key": "ca.crt"}
    assert render(values_file="embedded-redis").of_kind("ServiceMonitor") == []


def _controller_env(r) -> dict:
    deployment = r.one("Deployment", "rm-ringmaster")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container["env"]}


@pytest.mark.parametrize("args, field", [
    (["--set", "controller.replicas=0"], "/controller/replicas"),
    (["--set", "controller.strategy=BlueGreen"], "/controller/strategy"),
    (["--set", "controller.port=http"], "/controller/port"),
    (["--set-string", "controller.grpcPort=50051"], "/controller/grpcPort"),
    (["--set", "controller.port=70000"], "/controller/port"),
    (["--set", "redis.port=1.5"], "/redis/port"),
    (["--set", "launcher.type=slurm"], "/launcher/type"),
    (["--set", "launcher.type=kubernetes"], "/launcher/type"),  # the old name: say kuberay
    (["--set", "image.tag=not a tag"], "/image/tag"),
    (["--set", "otel.protocol=http/json"], "/otel/protocol"),
    (["--set", "controller.resources.limits.memory=lots"], "/controller/resources/limits/memory"),
    (["--set", "replicas=2"], "replicas"),  # unknown key (now controller.replicas): an error
    (["--set", "workers.nodeselector.a=b"], "nodeselector"),
    (["--set", "workers.extraResources.rdma/ib=one"], "/workers/extraResources"),
    (["--set", "kueue.queueName=no spaces"], "/kueue/queueName"),
    (["--set", "redis.enabled=false"], "/redis/external"),
])
def test_schema_rejects_bad_values(render, args, field):
    r = render(*args)
    assert r.rc != 0
    assert field in r.err, r.err


@pytest.mark.parametrize("args, message", [
    (["--set", "controller.replicas=2", "--set", "podDisruptionBudget.minAvailable=2"],
     "minAvailable"),
    (["--set", "launcher.type=kuberay", "--set", "launcher.ray.address=ray://h:10001"],
     "launcher.ray.address"),
    (["--set", "redis.external.url=redis://r:6379"], "redis.enabled"),
    # A clear message, not a schema's "'not' failed"; a digest pins the image instead.
    (["--set", "image.tag=latest"], "image.tag=latest is not allowed"),
    (["--set", "workers.image.tag=latest"], "workers.image.tag=latest is not allowed"),
    (["--set", "launcher.type=ray"], "launcher.ray.devLocal=true for development"),
    (["--set", "launcher.type=ray", "--set", "launcher.ray.devLocal=true",
      "--set", "controller.replicas=2"], "controller.replicas=1"),
    (["--set", "controller.leaderElection.renewDeadlineSeconds=20"], "renewDeadlineSeconds"),
    (["--set", "workers.resources.limits.nvidia\\.com/gpu=8"], "gpus_per_node"),
    (["--set", "launcher.type=ray", "--set", "launcher.ray.address=ray://h:10001",
      "--set", "kueue.queueName=q"], "kueue.queueName only applies"),
    (["--set", "serviceAccount.create=false"], "serviceAccount.name"),
])
def test_template_rejects_contradictions(render, args, message):
    r = render(*args)
    assert r.rc != 0 and message in r.err, r.err


def _leaf_paths(node, prefix=()):
    if isinstance(node, dict) and node:
        for k, v in node.items():
            yield from _leaf_paths(v, (*prefix, k))
    else:
        yield prefix


def _schema_at(schema: dict, path: tuple[str, ...]) -> dict | None:
    defs = schema["definitions"]
    node = schema
    for key in path:
        while "$ref" in node:
            node = {**defs[node["$ref"].rsplit("/", 1)[-1]], **{k: v for k, v in node.items()
                                                                if k != "$ref"}}
        props = node.get("properties") or {}
        if key in props:
            node = props[key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
    return node


def test_schema_covers_every_value():
    import json

    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing = [".".join(p) for p in _leaf_paths(values) if _schema_at(schema, p) is None]
    assert missing == []


def _uncommented_keys(text: str) -> list[str]:
    """Keys of values.yaml with no comment above them or above an enclosing key."""
    stack: list[tuple[int, bool]] = []  # (indent, covered by a comment)
    out, prev_comment = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            prev_comment = False
            continue
        if stripped.startswith("#"):
            prev_comment = True
            continue
        indent = len(line) - len(line.lstrip())
        if stripped.startswith("- ") or ":" not in stripped:
            prev_comment = False
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        covered = prev_comment or any(c for _, c in stack)
        key, _, rest = stripped.partition(":")
        if not covered and rest.strip():  # a leaf (value on the line) nobody explains
            out.append(key)
        stack.append((indent, covered))
        prev_comment = False
    return out


def test_every_value_is_commented():
    assert _uncommented_keys((CHART / "values.yaml").read_text()) == []


def test_comment_checker_finds_a_bare_key():
    assert _uncommented_keys("a:\n  # -- doc\n  b: 1\n  c: 2\n") == ["c"]


def test_chart_files_are_what_helm_packages(helm, tmp_path):
    proc = subprocess.run([helm, "package", str(CHART), "-d", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in Path(tmp_path).iterdir()] == ["ringmaster-0.2.0.tgz"]


def _undescribed(node: dict, path: str = "") -> list[str]:
    out = []
    for key, sub in (node.get("properties") or {}).items():
        where = f"{path}.{key}".lstrip(".")
        if not sub.get("description"):
            out.append(where)
        out += _undescribed(sub, where)
    if isinstance(node.get("items"), dict):
        out += _undescribed(node["items"], f"{path}[]")
    return out


def test_every_schema_field_has_a_description():
    import json

    schema = json.loads((CHART / "values.schema.json").read_text())
    assert _undescribed(schema) == []
    assert _undescribed({"properties": {"a": {"properties": {"b": {}}}}}) == ["a", "a.b"]


def test_a_digest_lets_latest_through(render):
    r = render("--set", "image.tag=latest", "--set", "image.digest=sha256:" + "a" * 64)
    c = r.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "ghcr.io/ringmaster-project/ringmaster@sha256:" + "a" * 64


def test_docs_list_every_value():
    docs = (CHART.parents[2] / "docs" / "deploy.md").read_text()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    missing = [".".join(p) for p in _leaf_paths(values) if f"`{'.'.join(p)}`" not in docs]
    assert missing == []


def _get_helm(*args: str, path_prefix: str | None = None) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if k != "HELM"}
    if path_prefix:
        env["PATH"] = f"{path_prefix}:{env['PATH']}"
    return subprocess.run([str(CHART.parents[1] / "get-helm.sh"), *args], capture_output=True,
                          text=True, timeout=300, env=env)


def test_pinned_helm_is_the_checked_binary(helm):
    import hashlib

    proc = _get_helm("--pinned")
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    script = (CHART.parents[1] / "get-helm.sh").read_text()
    pinned = script.split('HELM_SHA256="')[1].split('"')[0]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == pinned
    version = subprocess.run([str(path), "version", "--template", "{{.Version}}"],
                             capture_output=True, text=True, timeout=30).stdout
    assert version == "v4.1.4"


def test_a_helm_3_on_path_is_passed_over(helm, tmp_path):
    fake = tmp_path / "helm"
    fake.write_text("#!/bin/sh\necho v3.15.0\n")
    fake.chmod(0o755)
    proc = _get_helm(path_prefix=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() != str(fake) and "not Helm 4" in proc.stderr
