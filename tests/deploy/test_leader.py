"""Leader election over a Lease: hand-over, step-down, races, release; then two controllers.

Electors are stepped by hand on one shared timeline (their clocks are the test's), against
tests/deploy/kube_fakes.FakeKube (resourceVersions, 409 on a stale write) and, once,
through the real `kubernetes` client against tests/deploy/kube_http.KubeHttp. The last
test runs two real Controllers on one Redis, whose electors run on their own threads.
"""

from __future__ import annotations

import time

import pytest

from controller.launchers import FakeLauncher, StandbyLauncher
from controller.leader import (
    LEADER_RBAC_RULES,
    LeaderElectionConfig,
    LeaderElector,
    publish_leader_endpoint,
)
from controller.states import State
from tests.deploy.kube_fakes import FakeKube
from tests.deploy.kube_http import KubeHttp

NS, LEASE = "ml", "rm-ringmaster-leader"


class Timeline:
    def __init__(self):
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def _config(identity: str, **kw) -> LeaderElectionConfig:
    return LeaderElectionConfig(lease_name=LEASE, namespace=NS, identity=identity, **kw)


def _elector(kube, identity: str, clock, **kw) -> LeaderElector:
    return LeaderElector(_config(identity, **kw), coordination_api=kube, discovery_api=kube,
                         clock=clock, wall=lambda: 1.7e9 + clock())


class Flaky:
    """One replica's view of the API server: `down` cuts it off (a partition)."""

    def __init__(self, kube):
        self.kube, self.down = kube, False

    def __getattr__(self, name):
        def call(*args, **kwargs):
            if self.down:
                raise ConnectionError("API server unreachable from this replica")
            return getattr(self.kube, name)(*args, **kwargs)

        return call


def test_first_candidate_leads_the_other_stands_by():
    kube, t = FakeKube(), Timeline()
    a, b = _elector(kube, "rm-a", t), _elector(kube, "rm-b", t)
    assert a.step() is True and b.step() is False
    lease = kube.leases[(NS, LEASE)]
    assert lease["spec"]["holderIdentity"] == "rm-a"
    assert lease["spec"]["leaseDurationSeconds"] == 15
    for _ in range(20):  # the leader renews every retry period; the standby keeps waiting
        t.now += 2
        assert a.step() is True and b.step() is False
    assert kube.leases[(NS, LEASE)]["spec"]["leaseTransitions"] == 0


def test_standby_takes_over_within_a_lease_period_of_the_leaders_last_renewal():
    kube, t = FakeKube(), Timeline()
    a, b = _elector(kube, "rm-a", t), _elector(kube, "rm-b", t)
    a.step()
    b.step()
    last_renewal = t.now  # the leader dies here (no more steps)
    took_over = None
    while took_over is None and t.now < last_renewal + 60:
        t.now += 2
        if b.step():
            took_over = t.now
    # Not before the lease ran out, at most one retry period after.
    assert last_renewal + 15 <= took_over <= last_renewal + 15 + 2
    spec = kube.leases[(NS, LEASE)]["spec"]
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("rm-b", 1)
    t.now += 2
    assert a.step() is False  # the old leader comes back to a lease that is not its own
    assert b.step() is True


def test_a_cut_off_leader_steps_down_before_anyone_can_take_over():
    kube, t = FakeKube(), Timeline()
    view_a = Flaky(kube)
    a = LeaderElector(_config("rm-a"), coordination_api=view_a, clock=t)
    b = _elector(kube, "rm-b", t)
    a.step()
    b.step()
    view_a.down = True
    a_stopped = b_started = None
    while b_started is None and t.now < 6000:
        t.now += 1
        if a_stopped is None and not a.step():
            a_stopped = t.now
        if b_started is None and b.step():
            b_started = t.now
    assert a_stopped is not None and b_started is not None
    assert a_stopped <= t.now - 5  # renew deadline 10 s < lease 15 s: never two leaders
    assert a_stopped < b_started


def test_racing_candidates_never_both_win():
    kube, t = FakeKube(), Timeline()
    a, b, c = (_elector(kube, n, t) for n in ("rm-a", "rm-b", "rm-c"))
    a.step()
    assert b.step() is False and c.step() is False  # both observe a's lease, then a dies
    t.now += 16  # expired for both
    seen_by_c = c._read()  # c reads...
    assert b.step() is True  # ...b takes the lease in between...
    assert c._write(seen_by_c, t.now) is False  # ...c's write is stale: a 409, c stands by
    assert c.step() is False  # and on its next try b's fresh renewal keeps it waiting
    assert kube.leases[(NS, LEASE)]["spec"]["holderIdentity"] == "rm-b"


def test_release_hands_over_at_the_next_try():
    kube, t = FakeKube(), Timeline()
    changes = []
    a = LeaderElector(_config("rm-a"), coordination_api=kube, clock=t, on_change=changes.append)
    b = _elector(kube, "rm-b", t)
    a.step()
    b.step()
    a.release()
    t.now += 2
    assert b.step() is True  # no lease period to wait
    assert a.is_leader is False and kube.leases[(NS, LEASE)]["spec"]["holderIdentity"] == "rm-b"


def test_timing_must_let_the_leader_step_down_first():
    with pytest.raises(ValueError, match="renew_deadline_s"):
        _config("rm-a", lease_duration_s=10, renew_deadline_s=10)
    assert LeaderElectionConfig.from_env({}) is None
    cfg = LeaderElectionConfig.from_env({
        "RINGMASTER_LEADER_ELECTION_LEASE": LEASE, "RINGMASTER_LEADER_ELECTION_NAMESPACE": NS,
        "RINGMASTER_POD_NAME": "rm-ringmaster-7d9-x", "RINGMASTER_POD_IP": "10.1.2.3",
        "RINGMASTER_LEADER_SERVICE": LEASE, "RINGMASTER_LEADER_ELECTION_LEASE_DURATION_S": "30",
        "RINGMASTER_LEADER_ELECTION_RENEW_DEADLINE_S": "20",
        "RINGMASTER_LEADER_ELECTION_RETRY_PERIOD_S": "4"})
    assert (cfg.identity, cfg.pod_ip, cfg.lease_duration_s, cfg.retry_period_s) == \
        ("rm-ringmaster-7d9-x", "10.1.2.3", 30.0, 4.0)


def test_leader_endpoint_points_the_service_at_the_leader():
    kube = FakeKube()
    publish_leader_endpoint(kube, _config("rm-a", service_name=LEASE, pod_ip="10.0.0.7"),
                            port=50051)
    publish_leader_endpoint(kube, _config("rm-b", service_name=LEASE, pod_ip="fd00::9"),
                            port=50051)
    eps = kube.slices[(NS, LEASE)]
    assert eps["metadata"]["labels"]["kubernetes.io/service-name"] == LEASE
    assert eps["addressType"] == "IPv6" and eps["ports"] == [
        {"name": "grpc", "port": 50051, "protocol": "TCP"}]
    assert eps["endpoints"] == [{"addresses": ["fd00::9"], "conditions": {"ready": True},
                                 "targetRef": {"kind": "Pod", "name": "rm-b",
                                               "namespace": NS}}]


def test_through_the_real_client_with_exactly_the_rbac_verbs(tmp_path, monkeypatch):
    from kubernetes_validate import validate

    with KubeHttp() as server:
        cfg = tmp_path / "kubeconfig"
        cfg.write_text(server.kubeconfig())
        monkeypatch.setenv("KUBECONFIG", str(cfg))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        t = Timeline()
        a = LeaderElector(_config("rm-a", service_name=LEASE, pod_ip="10.0.0.7"), clock=t)
        b = LeaderElector(_config("rm-b", service_name=LEASE, pod_ip="10.0.0.8"), clock=t)
        assert a.step() is True and b.step() is False
        a.publish_endpoint(50051)
        t.now += 2
        assert a.step() is True  # a renewal: an update with the resourceVersion it read
        a.release()
        assert b.step() is True
        b.publish_endpoint(50051)
        lease = server.versioned[("leases", NS, LEASE)]
        eps = server.versioned[("endpointslices", NS, LEASE)]
    assert lease["spec"]["holderIdentity"] == "rm-b"
    assert eps["endpoints"][0]["addresses"] == ["10.0.0.8"]
    for obj in (lease, eps):  # what the client sent is a valid object of its kind
        body = {k: v for k, v in obj.items()}
        body["metadata"] = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
        validate(body, "1.35.0", strict=True)
    granted = {(r.api_group, r.resource, v) for r in LEADER_RBAC_RULES for v in r.verbs}
    assert set(server.calls) == granted


# two controllers on one Redis --------------------------------------------------------------
def _wait(predicate, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.mark.slow
def test_only_the_leader_launches_and_a_standby_takes_over(tmp_path):
    from controller.server import Controller, ControllerConfig
    from controller.spec import parse_job_spec

    kube = FakeKube()
    fakes = {"rm-a": FakeLauncher(), "rm-b": FakeLauncher()}
    # Generous against a loaded machine: a leader stalled for 6 s would step down early.
    timing = dict(lease_duration_s=8.0, renew_deadline_s=6.0, retry_period_s=0.25)

    def controller(identity: str, redis_url: str | None) -> Controller:
        config = ControllerConfig(state_dir=tmp_path / identity, port=0, grpc_port=0,
                                  launcher="fake", token="t" * 32, redis_url=redis_url,
                                  reconcile_interval_s=0.05,
                                  leader_election=_config(identity, **timing))
        return Controller(config, launcher_factory=lambda: fakes[identity],
                          elector_options=dict(coordination_api=kube, discovery_api=kube))

    ctl_a = controller("rm-a", None).start()
    _wait(lambda: ctl_a.leader.is_leader and ctl_a.machine.launcher is fakes["rm-a"],
          "rm-a to lead")
    socket_file = ctl_a.redis.client.connection_pool.connection_kwargs["path"]
    ctl_b = controller("rm-b", f"unix://{socket_file}").start()
    try:
        spec = parse_job_spec({"name": "demo", "model": "tiny", "dataset": {"path": "/d"},
                               "resources": {"num_ranks": 4, "cluster": "cpu"},
                               "training": {"steps": 10, "global_batch_tokens": 4096}})
        first, _ = ctl_b.store.create(spec)  # a submission through the standby's store
        _wait(lambda: ctl_a.store.get(first.id).state is State.RUNNING, "rm-a to run it")
        assert isinstance(ctl_b.machine.launcher, StandbyLauncher)
        # A stop through the standby: it only moves the job; the leader stops the workers.
        ctl_b.machine.request_stop(first.id)
        _wait(lambda: ctl_a.store.get(first.id).state is State.STOPPED, "the leader's stop")
        assert fakes["rm-a"].stopped == [first.id] and fakes["rm-b"].started == []

        # rm-a freezes (no renewals, no passes): rm-b takes over and launches.
        ctl_a.leader._closed.set()
        ctl_a.leader._threads[0].join(timeout=10)
        ctl_a.reconciler.close()
        second, _ = ctl_a.store.create(spec.model_copy(update={"name": "after"}))
        _wait(lambda: ctl_b.leader.is_leader, "rm-b to take over")
        _wait(lambda: ctl_b.store.get(second.id).state is State.RUNNING, "rm-b to run it")
        assert [j for j, _ in fakes["rm-b"].started] == [second.id]
        assert [j for j, _ in fakes["rm-a"].started] == [first.id]
        assert kube.leases[(NS, LEASE)]["spec"]["holderIdentity"] == "rm-b"
    finally:
        ctl_b.close()
        ctl_a.close()
