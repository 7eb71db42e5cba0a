"""The chart on a real GPU cluster: upgrades, leader election, identities, steering, Kueue,
Ingress and `helm test` (rendered with a real helm; see conftest.py)."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys

import pytest
import yaml

from controller import leader
from controller.launchers.kubernetes import KubernetesLauncherConfig
from controller.leader import LEADER_RBAC_RULES, LeaderElectionConfig
from tests.deploy.conftest import CHART, NAMESPACE

LEADER = "rm-ringmaster-leader"


def _controller(r) -> dict:
    return r.one("Deployment")["spec"]["template"]["spec"]


def _env(r) -> dict[str, dict]:
    return {e["name"]: e for e in _controller(r)["containers"][0]["env"]}


def _values(r) -> dict[str, str]:
    return {k: e["value"] for k, e in _env(r).items() if "value" in e}


def test_recreate_by_default_and_no_election(render):
    r = render()
    assert r.one("Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert r.one("Deployment")["spec"]["replicas"] == 1
    assert [o for o in r.of_kind("Role") if "leader" in o["metadata"]["name"]] == []
    assert not any(k.startswith("RINGMASTER_LEADER") for k in _env(r))
    assert {s["metadata"]["name"] for s in r.of_kind("Service")} == {"rm-ringmaster",
                                                                      "rm-ringmaster-redis"}
    # With one controller the workers dial the controller Service itself.
    assert _values(r)["RINGMASTER_CONTROLLER_ADDRESS"] == f"rm-ringmaster.{NAMESPACE}.svc:50051"


def _rules(role: dict) -> set[tuple]:
    return {(g, res, tuple(sorted(rule["verbs"])), tuple(rule.get("resourceNames", ())))
            for rule in role["rules"] for g in rule["apiGroups"] for res in rule["resources"]}


def test_two_replicas_render_the_lease_rbac_and_the_leader_service(render):
    r = render("--set", "controller.replicas=2")
    role = r.one("Role", "rm-ringmaster-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert _rules(role) == {(x.api_group, x.resource, tuple(sorted(x.verbs)),
                             (LEADER,) if x.named else ()) for x in LEADER_RBAC_RULES}
    binding = r.one("RoleBinding", "rm-ringmaster-leader-election")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "rm-ringmaster",
                                    "namespace": NAMESPACE}]
    svc = r.one("Service", LEADER)
    assert "selector" not in svc["spec"]  # the leader fills its EndpointSlice
    assert svc["spec"]["ports"][0]["name"] == "grpc"  # what publish_leader_endpoint names
    assert _values(r)["RINGMASTER_CONTROLLER_ADDRESS"] == f"{LEADER}.{NAMESPACE}.svc:50051"
    env = _env(r)
    assert env["RINGMASTER_POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["RINGMASTER_POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert r.one("PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert _controller(r)["automountServiceAccountToken"] is True


def test_the_controller_reads_the_leader_env_the_chart_writes(render):
    r = render(values_file="gpu-cluster")
    env = {**_values(r), "RINGMASTER_POD_NAME": "rm-ringmaster-5c9-x",
           "RINGMASTER_POD_IP": "10.4.0.12"}  # the downward API's values
    cfg = LeaderElectionConfig.from_env(env)
    assert (cfg.lease_name, cfg.namespace, cfg.service_name) == (LEADER, NAMESPACE, LEADER)
    assert (cfg.lease_duration_s, cfg.renew_deadline_s, cfg.retry_period_s) == (15, 10, 2)
    assert cfg.identity == "rm-ringmaster-5c9-x" and cfg.pod_ip == "10.4.0.12"
    read = set(re.findall(r'"(RINGMASTER_LEADER_[A-Z_]+)"', inspect.getsource(leader)))
    assert {k for k in env if k.startswith("RINGMASTER_LEADER")} == read


def test_rolling_update_turns_leader_election_on(render):
    r = render("--set", "controller.strategy=RollingUpdate")
    strategy = r.one("Deployment")["spec"]["strategy"]
    assert strategy == {"type": "RollingUpdate",
                        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    assert "RINGMASTER_LEADER_ELECTION_LEASE" in _env(r)
    r.one("Role", "rm-ringmaster-leader-election")


def test_controller_service_account_follows_kuberays_convention(render):
    r = render(values_file="gpu-cluster")
    sa = r.one("ServiceAccount", "rm-ringmaster")
    assert sa["metadata"]["annotations"] == {
        "eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/ringmaster-controller"}
    r = render("--set", "serviceAccount.create=false", "--set", "serviceAccount.name=ops-sa")
    assert [o["metadata"]["name"] for o in r.of_kind("ServiceAccount")] == []
    assert _controller(r)["serviceAccountName"] == "ops-sa"
    assert r.one("RoleBinding")["subjects"][0]["name"] == "ops-sa"
    named = render("--set", "serviceAccount.name=rm-controller")
    assert named.one("ServiceAccount")["metadata"]["name"] == "rm-controller"


def test_workers_get_their_own_optional_service_account(render):
    r = render(values_file="gpu-cluster")
    (worker_sa,) = [o for o in r.of_kind("ServiceAccount")
                    if o["metadata"]["name"] == "rm-ringmaster-worker"]
    assert worker_sa["metadata"]["namespace"] == "training"
    assert worker_sa["automountServiceAccountToken"] is False
    assert "ringmaster-workers" in worker_sa["metadata"]["annotations"][
        "eks.amazonaws.com/role-arn"]
    assert [o["metadata"]["name"] for o in render().of_kind("ServiceAccount")] == \
        ["rm-ringmaster"]


def test_the_launcher_reads_the_steering_the_chart_writes(render):
    r = render(values_file="gpu-cluster")
    values = yaml.safe_load((CHART / "ci" / "gpu-cluster-values.yaml").read_text())
    config = KubernetesLauncherConfig.from_env("0.0.0.0:50051", _values(r))
    w, chart = config.cluster.workers, values["workers"]
    assert dict(w.resources) == chart["resources"]
    assert dict(w.node_selector) == chart["nodeSelector"]
    assert [dict(t) for t in w.tolerations] == chart["tolerations"]
    assert dict(w.affinity) == chart["affinity"]
    assert (w.priority_class_name, w.shm_size) == ("training", "256Gi")
    assert [dict(e) for e in w.extra_env] == chart["extraEnv"]
    assert dict(w.extra_resources) == {"vpc.amazonaws.com/efa": 32}
    assert w.service_account_name == "rm-ringmaster-worker"  # the created one
    assert w.job_service_accounts == ("ringmaster-research",)
    assert w.queue_name == "gpu-team-a"
    assert config.cluster.image == "registry.example.com/ringmaster-worker:0.1.0-cuda12.8"
    assert (config.max_gpus, config.namespaces) == (512, ("training",))
    assert config.cluster.controller_address == f"{LEADER}.{NAMESPACE}.svc:50051"


def test_ingress_is_off_by_default_and_carries_tls(render):
    assert render().of_kind("Ingress") == []
    r = render(values_file="gpu-cluster")
    ing = r.one("Ingress")
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert ing["spec"]["tls"] == [{"secretName": "ringmaster-tls",
                                   "hosts": ["ringmaster.example.com"]}]
    (path,) = ing["spec"]["rules"][0]["http"]["paths"]
    assert path["backend"]["service"] == {"name": "rm-ringmaster", "port": {"name": "http"}}
    api_rule = r.one("NetworkPolicy", "rm-ringmaster")["spec"]["ingress"][0]
    peers = [p for p in api_rule["from"] if p.get("podSelector", {}).get("matchLabels") ==
             {"app.kubernetes.io/name": "ingress-nginx"}]
    assert len(peers) == 1 and api_rule["ports"] == [{"port": "http", "protocol": "TCP"}]


def _test_pod(r) -> dict:
    (pod,) = [o for o in r.of_kind("Pod")
              if o["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"]
    return pod


def test_helm_test_pod_calls_readyz_with_the_token(render, variant):
    r = render(values_file=variant)
    pod = _test_pod(r)
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never" and spec["automountServiceAccountToken"] is False
    (c,) = spec["containers"]
    env = {e["name"]: e for e in c["env"]}
    secret = "ringmaster-api-token" if variant == "external-redis" else "rm-ringmaster-secrets"
    assert env["RINGMASTER_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == secret
    assert env["RINGMASTER_URL"]["value"] == f"http://rm-ringmaster.{NAMESPACE}.svc:8000"
    assert "/readyz" in c["args"][0]
    # The NetworkPolicy lets it in like any API client.
    assert pod["metadata"]["labels"]["ringmaster.io/client"] == "true"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from tests.controller.harness import running_controller

    with running_controller(tmp_path_factory.mktemp("state")) as harness:
        yield harness


@pytest.mark.parametrize("token_ok", [True, False])
def test_helm_test_script_passes_against_a_real_controller(render, live, token_ok):
    """The pod's script, run here against a controller on loopback: 0 with the token."""
    script = _test_pod(render())["spec"]["containers"][0]["args"][0]
    env = {"RINGMASTER_URL": live.url,
           "RINGMASTER_TOKEN": live.token if token_ok else "wrong-token"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode == 0) is token_ok, proc.stdout + proc.stderr
    if token_ok:
        assert '/readyz 200 {"status": "ok"' in proc.stdout


def test_kueue_queue_reaches_the_launcher_only_with_kuberay(render):
    r = render("--set", "kueue.queueName=gpu-team-a")
    assert _values(r)["RINGMASTER_K8S_KUEUE_QUEUE"] == "gpu-team-a"
    assert json.loads(_values(r)["RINGMASTER_K8S_WORKERS"])["serviceAccountName"] == ""
