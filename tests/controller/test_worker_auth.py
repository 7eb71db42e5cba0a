"""Who may call the workers' gRPC port (issue 23): only the ranks of the current attempt.

An unauthenticated local process could once fail any job (`ReportFailure`) or read its
whole spec (`Register`). Here: real gRPC on loopback against the real WorkerService and
Redis; the secret's hand-off by the Ray launcher (environment, not argv) and the
Kubernetes launcher (a per-attempt Secret the pods reference); TLS on both ports.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import stat
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest

from controller.launchers.kuberay import WORKER_SECRET_KEY, worker_secret_name
from controller.launchers.kubernetes import KubernetesLauncher
from controller.launchers.ray import RayLauncher
from controller.redis_server import open_redis
from controller.rpc import ringmaster_pb2 as pb
from controller.rpc import ringmaster_pb2_grpc as pb_grpc
from controller.spec import parse_job_spec
from controller.states import JobRecord, State
from controller.store import JobStore
from controller.worker_auth import CONTROLLER_CA_ENV, WORKER_SECRET_ENV, WorkerAuth
from controller.worker_service import WorkerService, serve_grpc
from scheduler.synth import synthesize
from tests.controller.harness import DEMO_SPEC, running_controller
from tests.deploy.kube_fakes import NS, FakeKube, FakeRayJobs, FakeWatch, launcher_config
from tests.deploy.kube_fakes import make_job as make_k8s_job
from workers import controller_client
from workers.controller_client import ControllerClient, Unauthenticated, WorkerIdentity

AUTH = WorkerAuth.from_token("auth-test-token")


class Events:
    def __init__(self):
        self.events = []

    def report(self, event):
        self.events.append(event)


def self_signed(tmp_path) -> tuple:
    """A certificate for 127.0.0.1 (and its key), as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ringmaster-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture
def plane(tmp_path, request):
    tls = getattr(request, "param", False)
    redis = open_redis(state_dir=tmp_path / "state")
    store, launcher = JobStore(redis.client), Events()
    pool = ThreadPoolExecutor(max_workers=1)
    service = WorkerService(store=store, launcher=launcher, planner_pool=pool, auth=AUTH)
    creds, cert = None, None
    if tls:
        cert, key = self_signed(tmp_path)
        creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server, port = serve_grpc(service, host="127.0.0.1", port=0, credentials=creds)
    synthesize(tmp_path / "data", distribution="uniform", num_samples=20, max_length=50,
               seed=1)
    spec = parse_job_spec({**DEMO_SPEC, "dataset": {"path": str(tmp_path / "data")},
                           "resources": {"num_ranks": 2, "cluster": "cpu"}})
    job, _ = store.create(spec)
    job = store.transition(job.id, src=State.PENDING, dst=State.SCHEDULING, reason="Admitted",
                           attempt=1)
    yield dict(store=store, launcher=launcher, job=job, address=f"127.0.0.1:{port}", cert=cert,
               redis=redis)
    server.stop(grace=None)
    service.close()
    pool.shutdown(wait=False, cancel_futures=True)
    redis.close()


def stub(plane) -> pb_grpc.WorkerServiceStub:
    return pb_grpc.WorkerServiceStub(grpc.insecure_channel(plane["address"]))


def worker(plane, attempt: int = 1) -> pb.WorkerId:
    return pb.WorkerId(job_id=plane["job"].id, attempt=attempt, rank=0)


def test_grpc_without_the_secret_is_refused(plane):
    s, me = stub(plane), worker(plane)
    other_attempt = [("authorization", f"Bearer {AUTH.secret_for(plane['job'].id, 2)}")]
    other_key = [("authorization",
                  f"Bearer {WorkerAuth.from_token('x').secret_for(plane['job'].id, 1)}")]
    calls = [
        lambda md: s.ReportFailure(pb.FailureReport(worker=me, step=1, error="injected"),
                                   metadata=md, timeout=10),
        lambda md: s.Register(pb.RegisterRequest(worker=me, host="h", pid=1), metadata=md,
                              timeout=10),
        lambda md: s.Heartbeat(pb.HeartbeatRequest(worker=me, step=0, progress=1),
                               metadata=md, timeout=10),
        lambda md: s.ReportStep(pb.StepReport(worker=me, step=0), metadata=md, timeout=10),
        lambda md: next(iter(s.StreamPlans(pb.PlanRequest(worker=me), metadata=md,
                                           timeout=10))),
    ]
    for metadata in (None, [("authorization", "Bearer nope")], other_attempt, other_key,
                     [("authorization", "Basic " + AUTH.secret_for(plane["job"].id, 1))]):
        for call in calls:
            with pytest.raises(grpc.RpcError) as err:
                call(metadata)
            assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert "job_spec" not in (err.value.details() or "")
    rec = plane["store"].get(plane["job"].id)
    assert rec.state is State.SCHEDULING and plane["launcher"].events == []
    unknown = pb.WorkerId(job_id="no-such-job", attempt=1, rank=0)
    with pytest.raises(grpc.RpcError) as err:  # no hint whether a job exists
        s.Register(pb.RegisterRequest(worker=unknown), timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_the_attempts_secret_is_accepted_and_the_fence_still_applies(plane):
    job_id = plane["job"].id
    good = ControllerClient(plane["address"], WorkerIdentity(job_id=job_id, attempt=1, rank=0),
                            secret=AUTH.secret_for(job_id, 1), reconnect_s=5)
    assert good.register(host="h", pid=1).world_size == 2
    stale = ControllerClient(plane["address"], WorkerIdentity(job_id=job_id, attempt=0,
                                                              rank=0),
                             secret=AUTH.secret_for(job_id, 0), reconnect_s=5)
    with pytest.raises(controller_client.Fenced, match="is not current"):
        stale.register(host="h", pid=1)
    anonymous = ControllerClient(plane["address"], WorkerIdentity(job_id=job_id, attempt=1,
                                                                  rank=1),
                                 secret="", reconnect_s=5)
    with pytest.raises(Unauthenticated, match="RINGMASTER_WORKER_SECRET"):
        anonymous.heartbeat(step=0, progress=1)


def test_a_store_outage_is_unavailable_which_workers_retry(plane):
    import signal

    job_id = plane["job"].id
    md = [("authorization", f"Bearer {AUTH.secret_for(job_id, 1)}")]
    # the rank's current process (its incarnation: an older one of rank 0 is fenced off)
    me = ControllerClient(plane["address"], WorkerIdentity(job_id=job_id, attempt=1, rank=0),
                          secret=AUTH.secret_for(job_id, 1), reconnect_s=5)
    current = pb.WorkerId(job_id=job_id, attempt=1, rank=0,
                          incarnation=me.register(host="h", pid=1).incarnation)
    pid = plane["redis"].server_pid
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(grpc.RpcError) as err:
            stub(plane).Heartbeat(pb.HeartbeatRequest(worker=current, step=0,
                                                      progress=1), metadata=md, timeout=30)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE  # in controller_client._RETRYABLE
    assert stub(plane).Heartbeat(pb.HeartbeatRequest(worker=current, step=0,
                                                     progress=1), metadata=md,
                                 timeout=30).accepted


def test_the_client_reads_its_secret_from_the_environment(plane, monkeypatch):
    job_id = plane["job"].id
    monkeypatch.setenv(WORKER_SECRET_ENV, AUTH.secret_for(job_id, 1))
    c = ControllerClient(plane["address"], WorkerIdentity(job_id=job_id, attempt=1, rank=1))
    assert c.register(host="h", pid=1).accepted


def test_names_shared_with_the_workers_match():
    # workers/ may not import controller.worker_auth; the two spell the names separately.
    assert controller_client.WORKER_SECRET_ENV == WORKER_SECRET_ENV
    assert controller_client.CONTROLLER_CA_ENV == CONTROLLER_CA_ENV
    assert len({AUTH.secret_for("j", a) for a in (1, 2)} | {AUTH.secret_for("k", 1)}) == 3


@pytest.mark.parametrize("plane", [True], indirect=True)
def test_grpc_over_tls(plane):
    job_id = plane["job"].id
    ident = WorkerIdentity(job_id=job_id, attempt=1, rank=0)
    secure = ControllerClient(plane["address"], ident, secret=AUTH.secret_for(job_id, 1),
                              ca=str(plane["cert"]), reconnect_s=2)
    assert secure.register(host="h", pid=1).accepted
    pem = ControllerClient(plane["address"], ident, secret=AUTH.secret_for(job_id, 1),
                           ca=plane["cert"].read_text(), reconnect_s=2)  # PEM text works too
    assert pem.register(host="h", pid=1).accepted
    plain = ControllerClient(plane["address"], ident, secret=AUTH.secret_for(job_id, 1),
                             ca="", call_timeout_s=1, reconnect_s=1)
    with pytest.raises(grpc.RpcError):
        plain.register(host="h", pid=1)


def test_rest_over_tls(tmp_path):
    from controller.server import TlsFiles

    cert, key = self_signed(tmp_path)
    with running_controller(tmp_path / "state", tls=TlsFiles(cert=cert, key=key)) as h:
        url = h.url.replace("http://", "https://")
        assert httpx.get(f"{url}/healthz", verify=str(cert)).status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz")  # not trusted by the system's CAs
        h.controller.write_endpoint(url)
        from controller.client import RingmasterClient

        with RingmasterClient(state_dir=tmp_path / "state", token=h.token) as rm:
            assert rm.url == url and rm.list().total == 0  # the CA from controller.json


FAKE_DRIVER = """#!{python}
import json, os, sys
args = sys.argv[1:]
exit_file = args[args.index("--exit-file") + 1]
json.dump({{"argv": args, "secret": os.environ.get("RINGMASTER_WORKER_SECRET"),
           "ca": os.environ.get("RINGMASTER_CONTROLLER_CA")}},
          open(exit_file + ".seen", "w"))
json.dump({{"code": 0, "message": "done"}}, open(exit_file, "w"))
"""


def test_ray_launcher_hands_the_secret_over_in_the_environment(tmp_path, monkeypatch):
    exe = tmp_path / "fake-python"
    exe.write_text(FAKE_DRIVER.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv(WORKER_SECRET_ENV, "the-controller's-own")  # never inherited
    rl = RayLauncher(state_dir=tmp_path / "state", controller_address="127.0.0.1:1",
                     python=str(exe), total_ranks=4, worker_secret=AUTH.secret_for,
                     controller_ca="/etc/ringmaster/ca.crt")
    spec = parse_job_spec({**DEMO_SPEC, "resources": {"num_ranks": 2, "cluster": "cpu"}})
    rl.start(JobRecord(id="job-1", spec=spec, state=State.SCHEDULING, attempt=3), 3)
    rec = rl._drivers["job-1"]
    seen_path = tmp_path / "state" / "ray" / "job-1-3.exit.seen"
    deadline = time.monotonic() + 60
    while not (seen_path.exists() and (tmp_path / "state" / "ray" / "job-1-3.exit").exists()):
        assert time.monotonic() < deadline, "the fake driver did not run"
        time.sleep(0.05)
    seen = json.loads(seen_path.read_text())
    secret = AUTH.secret_for("job-1", 3)
    assert seen["secret"] == secret and seen["ca"] == "/etc/ringmaster/ca.crt"
    assert not any(secret in a for a in seen["argv"])
    assert rl.tracks("job-1", 3) and not rl.tracks("job-1", 2)
    assert stat.S_IMODE((tmp_path / "state" / "ray").stat().st_mode) == 0o700
    assert stat.S_IMODE(os.stat(rec.log_path).st_mode) == 0o600


def test_kubernetes_launcher_puts_the_secret_in_a_secret_the_pods_reference(tmp_path):
    kube = FakeKube()
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    la = KubernetesLauncher(config=launcher_config(), custom_api=kube, core_api=kube,
                            ray_jobs=FakeRayJobs(), watch_factory=FakeWatch, watch=False,
                            worker_secret=AUTH.secret_for, controller_ca=str(ca))
    job = make_k8s_job(num_ranks=16)
    la.start(job, 2)
    name = worker_secret_name(job.id, 2)
    secret = kube.secrets[(NS, name)]
    assert secret["stringData"][WORKER_SECRET_KEY] == AUTH.secret_for(job.id, 2)
    assert secret["stringData"]["controller-ca"] == ca.read_text()
    assert kube.calls.index(("", "secrets", "create")) < \
        kube.calls.index(("ray.io", "rayclusters", "create"))  # before any pod needs it
    cluster = next(iter(kube.clusters.values()))
    assert AUTH.secret_for(job.id, 2) not in json.dumps(cluster)  # never a literal
    pods = [cluster["spec"]["headGroupSpec"]] + cluster["spec"]["workerGroupSpecs"]
    for group in pods:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env[WORKER_SECRET_ENV]["valueFrom"]["secretKeyRef"] == {
            "name": name, "key": WORKER_SECRET_KEY}
        assert env[CONTROLLER_CA_ENV]["valueFrom"]["secretKeyRef"]["name"] == name
    la.stop(job.id)
    assert (NS, name) not in kube.secrets  # gone with its cluster
