"""What the rendered chart must say: security, probes, resources, RBAC, network, secrets."""

from __future__ import annotations

import base64
import re

import pytest
import yaml

from controller.launchers.kuberay import LAUNCHER_RBAC_RULES
from tests.deploy.conftest import CHART, NAMESPACE

WORKLOADS = ("Deployment", "StatefulSet")
RAY_VARIANTS = ("external-redis", "local-ray-dev")  # launcher.type=ray; the rest: kuberay


def _pod_specs(rendered) -> list[tuple[str, dict]]:
    return [(o["metadata"]["name"], o["spec"]["template"]["spec"])
            for kind in WORKLOADS for o in rendered.of_kind(kind)]


def _controller(rendered) -> dict:
    return rendered.one("Deployment")["spec"]["template"]["spec"]


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_pods_run_non_root_with_runtime_default_seccomp(rendered):
    assert len(_pod_specs(rendered)) >= 1
    for name, spec in _pod_specs(rendered):
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0, name
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, name


def test_containers_are_locked_down(rendered):
    for name, spec in _pod_specs(rendered):
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            assert sc.get("privileged") is False, name
            mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts, f"{name}: read-only root needs a scratch /tmp"
            scratch = {v["name"]: v for v in spec["volumes"]}[mounts["/tmp"]]
            assert "emptyDir" in scratch


def test_every_container_has_cpu_and_memory_requests_and_limits(rendered):
    for name, spec in _pod_specs(rendered):
        for c in spec["containers"]:
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][part].keys(), (name, part)


def test_controller_probes_hit_health_endpoints(rendered):
    c = _controller(rendered)["containers"][0]
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    # The startup probe lets a slow first start (Redis, Ray) finish before liveness counts.
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 120


def test_redis_probes_and_append_only_persistence(render):
    r = render(values_file="embedded-redis")
    sts = r.one("StatefulSet")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert {"startupProbe", "livenessProbe", "readinessProbe"} <= c.keys()
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--dir") + 1] == "/data"
    assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]}["/data"] == "data"
    (pvc,) = sts["spec"]["volumeClaimTemplates"]
    assert pvc["metadata"]["name"] == "data"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "8Gi"
    # The password travels through the environment, never as a literal in argv.
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert "secretKeyRef" in _env(c)["REDIS_PASSWORD"]["valueFrom"]


def test_controller_command_line_and_service_ports(rendered, variant):
    c = _controller(rendered)["containers"][0]
    assert c["command"] == ["ringmaster"]
    launcher = "ray" if variant in RAY_VARIANTS else "kuberay"
    assert c["args"] == ["serve", "--host=0.0.0.0", "--port=8000", "--grpc-port=50051",
                         "--state-dir=/var/lib/ringmaster", f"--launcher={launcher}"]
    svc = rendered.one("Service", "rm-ringmaster")
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert ports["http"] == 8000 and ports["grpc"] == 50051
    assert re.fullmatch(r"[^:]+:\d+\.\d+\.\d+(-[\w.]+)?", c["image"]), "tag must be pinned"


def test_service_account_token_only_where_the_api_is_called(rendered, variant):
    # kuberay launcher, or leader election (external-redis runs two replicas).
    k8s = variant != "local-ray-dev"
    assert _controller(rendered)["automountServiceAccountToken"] is k8s
    sa = rendered.one("ServiceAccount", "rm-ringmaster")
    assert sa["automountServiceAccountToken"] is k8s
    for name, spec in _pod_specs(rendered):
        if name.endswith("-redis"):
            assert spec["automountServiceAccountToken"] is False


def _rules(obj: dict) -> set[tuple[str, str, tuple[str, ...]]]:
    return {(g, r, tuple(sorted(rule["verbs"])))
            for rule in obj["rules"] for g in rule["apiGroups"] for r in rule["resources"]}


EXPECTED_RULES = {(r.api_group, r.resource, tuple(sorted(r.verbs))) for r in LAUNCHER_RBAC_RULES}


def test_rbac_grants_exactly_the_launchers_verbs_in_listed_namespaces(render):
    r = render(values_file="kubernetes-launcher-on")
    assert r.of_kind("Role") == [] and r.of_kind("ClusterRoleBinding") == []
    role = r.one("ClusterRole")  # several namespaces were asked for
    assert _rules(role) == EXPECTED_RULES
    bindings = r.of_kind("RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == \
        ["ringmaster-batch", "ringmaster-jobs"]
    for b in bindings:
        assert b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                "name": role["metadata"]["name"]}
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "rm-ringmaster",
                                  "namespace": NAMESPACE}]


def test_one_namespace_gets_a_namespaced_role(render):
    r = render()  # the default launcher is kuberay
    assert r.of_kind("ClusterRole") == []
    role = r.one("Role")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert _rules(role) == EXPECTED_RULES
    assert r.one("RoleBinding")["roleRef"]["kind"] == "Role"
    env = _env(r.one("Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert env["RINGMASTER_K8S_NAMESPACES"]["value"] == NAMESPACE
    assert env["RINGMASTER_CONTROLLER_ADDRESS"]["value"] == f"rm-ringmaster.{NAMESPACE}.svc:50051"


def test_no_rbac_without_the_kubernetes_launcher(render):
    r = render(values_file="local-ray-dev")
    for kind in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"):
        assert r.of_kind(kind) == []


def _controller_policy(r) -> dict:
    return r.one("NetworkPolicy", "rm-ringmaster")["spec"]


def _egress_ports(spec: dict) -> set[int]:
    return {p["port"] for rule in spec["egress"] for p in rule.get("ports", [])}


def test_network_policy_on_by_default(rendered):
    spec = _controller_policy(rendered)
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "controller"
    api_rule, grpc_rule = spec["ingress"][:2]
    assert api_rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert api_rule["from"][0]["podSelector"]["matchLabels"] == {"ringmaster.io/client": "true"}
    assert grpc_rule["ports"] == [{"port": "grpc", "protocol": "TCP"}]
    assert grpc_rule["from"][0]["podSelector"]["matchLabels"] == {"ringmaster.io/worker": "true"}
    assert 53 in _egress_ports(spec)


def test_network_policy_egress_per_variant(render):
    embedded = render(values_file="embedded-redis")
    spec = _controller_policy(embedded)
    assert {6379, 4317, 4318} <= _egress_ports(spec)
    redis = embedded.one("NetworkPolicy", "rm-ringmaster-redis")["spec"]
    assert redis["egress"] == [] and redis["ingress"][0]["ports"][0]["port"] == 6379
    k8s = _controller_policy(render(values_file="kubernetes-launcher-on"))
    assert {443, 6443, 8265, 10001, 6379} <= _egress_ports(k8s)
    head_rules = [p for rule in k8s["egress"] for p in rule["to"]
                  if p.get("podSelector", {}).get("matchLabels", {}).get("ray.io/node-type")]
    assert sorted(p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
                  for p in head_rules) == ["ringmaster-batch", "ringmaster-jobs"]
    assert render("--set", "networkPolicy.enabled=false").of_kind("NetworkPolicy") == []


def test_pdb_only_from_two_replicas(render):
    assert render().of_kind("PodDisruptionBudget") == []
    pdb = render(values_file="external-redis").one("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1


NOT_SECRET = {"RINGMASTER_K8S_IMAGE_PULL_SECRETS"}  # names of Secrets, not their contents


def _secret_literals(rendered) -> list[str]:
    """Env vars whose name smells secret but whose value is written in the manifest."""
    bad = []
    for name, spec in _pod_specs(rendered):
        for c in spec["containers"]:
            for e in c.get("env", []):
                if e["name"] in NOT_SECRET:
                    continue
                if re.search(r"TOKEN|PASSWORD|SECRET|REDIS_URL|AUTH", e["name"]) and "value" in e:
                    if e["name"] == "REDIS_URL" and "$(REDIS_PASSWORD)" in e["value"]:
                        continue  # composed from the Secret-backed variable
                    bad.append(f"{name}/{e['name']}")
    return bad


def test_no_secret_is_written_into_a_pod_spec(rendered):
    assert _secret_literals(rendered) == []


def test_no_default_secrets_in_values():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["auth"]["existingSecret"] == ""
    assert values["redis"]["external"]["url"] == ""
    text = (CHART / "values.yaml").read_text().lower()
    assert "password:" not in text and "token:" not in text


def _secret_data(r) -> dict[str, str]:
    return {k: base64.b64decode(v).decode()
            for k, v in r.one("Secret", "rm-ringmaster-secrets")["data"].items()}


def test_generated_secrets_are_random_and_long(render):
    first = _secret_data(render(values_file="embedded-redis"))
    second = _secret_data(render("--set", "otel.enabled=false"))  # an independent render
    assert first.keys() == {"token", "redis-password"}
    assert len(first["token"]) == 48 and len(first["redis-password"]) == 32
    assert first["token"] != second["token"]
    assert first["redis-password"] != second["redis-password"]


def test_existing_secrets_are_referenced_not_created(render):
    r = render(values_file="external-redis")
    assert r.of_kind("Secret") == []
    env = _env(_controller(r)["containers"][0])
    assert env["RINGMASTER_TOKEN"]["valueFrom"]["secretKeyRef"] == \
        {"name": "ringmaster-api-token", "key": "token"}
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "ringmaster-redis",
                                                             "key": "url"}


def test_external_url_value_goes_into_the_secret(render):
    r = render(values_file="kubernetes-launcher-on")
    assert _secret_data(r)["redis-url"] == "rediss://redis.example.com:6380/0"
    assert "redis-password" not in _secret_data(r)
    assert r.of_kind("StatefulSet") == []


@pytest.mark.parametrize("variant_name, expected", [
    ("embedded-redis", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability"
                        ".svc:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
                        "OTEL_TRACES_EXPORTER": "otlp"}),
    ("kubernetes-launcher-on", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                                "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=ci"}),
    ("external-redis", {"OTEL_TRACES_EXPORTER": "none"}),
])
def test_otel_settings_from_values(render, variant_name, expected):
    env = _env(_controller(render(values_file=variant_name))["containers"][0])
    assert {k: env[k]["value"] for k in expected} == expected
    assert env["OTEL_SERVICE_NAME"]["value"] == "ringmaster-controller"


def test_otel_disabled(render):
    env = _env(_controller(render("--set", "otel.enabled=false"))["containers"][0])
    assert env["OTEL_SDK_DISABLED"]["value"] == "true"
    assert not any(k.startswith("OTEL_EXPORTER") for k in env)


def test_local_ray_gets_shared_memory_only_when_local(render):
    def shm(r):
        return [v for v in _controller(r)["volumes"] if v["name"] == "shm"]

    assert shm(render(values_file="local-ray-dev"))[0]["emptyDir"]["medium"] == "Memory"
    assert shm(render()) == []  # kuberay: the Ray pods have their own
    assert shm(render(values_file="external-redis")) == []  # RAY_ADDRESS points elsewhere
    assert shm(render(values_file="kubernetes-launcher-on")) == []


def test_the_launcher_reads_the_env_the_chart_writes(render):
    """Chart and launcher agree on every RINGMASTER_K8S_* variable (no dead settings)."""
    from controller.launchers.kubernetes import KubernetesLauncherConfig

    r = render(values_file="kubernetes-launcher-on")
    env = {k: e["value"] for k, e in _env(_controller(r)["containers"][0]).items()
           if "value" in e}
    config = KubernetesLauncherConfig.from_env("0.0.0.0:50051", env)
    assert config.namespaces == ("ringmaster-jobs", "ringmaster-batch")
    assert config.cluster.image == "registry.example.com/ringmaster-worker:0.1.0-cuda12.8"
    assert config.cluster.controller_address == f"rm-ringmaster.{NAMESPACE}.svc:50051"
    assert config.cluster.owner == "rm-ringmaster"
    assert config.cluster.head_resources["requests"] == {"cpu": "2", "memory": "8Gi"}
    assert (config.ready_timeout_s, config.max_gpus) == (900, 0)
    assert (config.cluster.cpus_per_rank, config.cluster.host_memory_fraction) == (8, 0.85)
    assert config.cluster.env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert config.cluster.image_pull_secrets == ("registry-example",)
    assert [(v.name, v.mount_path, v.read_only) for v in config.cluster.volumes] == \
        [("datasets", "/data", True), ("checkpoints", "/checkpoints", False)]
    assert config.cluster.volumes[0].source == {
        "persistentVolumeClaim": {"claimName": "ringmaster-datasets"}}
    k8s_vars = {k for k in env if k.startswith("RINGMASTER_K8S_")}
    import inspect

    import controller.launchers.kubernetes_config as module

    read = set(re.findall(r'"(RINGMASTER_K8S_[A-Z_]+)"', inspect.getsource(module)))
    assert k8s_vars == read
    # The owner label the NetworkPolicy selects Ray heads by is the one the launcher sets.
    policy = _controller_policy(r)
    owners = {p["podSelector"]["matchLabels"].get("ringmaster.io/owner")
              for rule in policy["egress"] for p in rule["to"] if "podSelector" in p}
    assert config.cluster.owner in owners


def test_shared_volumes_are_mounted_read_only_in_the_controller(render):
    spec = _controller(render(values_file="kubernetes-launcher-on"))
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["datasets"] == {"name": "datasets", "mountPath": "/data", "readOnly": True}
    assert mounts["checkpoints"]["readOnly"] is True  # the controller never writes them
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["checkpoints"]["nfs"] == {"server": "nfs.example.com",
                                             "path": "/exports/ringmaster"}
    assert spec["imagePullSecrets"] == [{"name": "registry-example"}]


@pytest.mark.parametrize("args, field", [
    (["--set", "storage.volumes[0].name=shm", "--set", "storage.volumes[0].mountPath=/x",
      "--set", "storage.volumes[0].source.emptyDir.medium=Memory"], "/storage/volumes/0/name"),
    (["--set", "storage.volumes[0].name=d", "--set", "storage.volumes[0].mountPath=data",
      "--set", "storage.volumes[0].source.emptyDir.medium=Memory"],
     "/storage/volumes/0/mountPath"),
    (["--set", "storage.volumes[0].name=d", "--set", "storage.volumes[0].mountPath=/d"],
     "/storage/volumes/0"),  # no source
])
def test_bad_shared_volumes_are_rejected(render, args, field):
    r = render(*args)
    assert r.rc != 0 and field in r.err, r.err


def test_local_ray_drivers_may_write_checkpoints(render):
    r = render("--set", "launcher.type=ray", "--set", "launcher.ray.devLocal=true",
               "--set", "storage.volumes[0].name=ckpt",
               "--set", "storage.volumes[0].mountPath=/checkpoints",
               "--set", "storage.volumes[0].source.persistentVolumeClaim.claimName=c",
               "--set", "storage.volumes[1].name=data", "--set", "storage.volumes[1].readOnly=true",
               "--set", "storage.volumes[1].mountPath=/data",
               "--set", "storage.volumes[1].source.persistentVolumeClaim.claimName=d")
    mounts = {m["name"]: m for m in _controller(r)["containers"][0]["volumeMounts"]}
    assert mounts["ckpt"]["readOnly"] is False and mounts["data"]["readOnly"] is True


def test_api_client_cidrs_open_only_the_rest_port(render):
    spec = _controller_policy(render("--set", "networkPolicy.apiClientCidrs={203.0.113.0/24}"))
    api_rule = spec["ingress"][0]
    assert {"ipBlock": {"cidr": "203.0.113.0/24"}} in api_rule["from"]
    assert api_rule["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert all("ipBlock" not in p for rule in spec["ingress"][1:] for p in rule["from"])
