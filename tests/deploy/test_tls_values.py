"""The chart's TLS, data-root and connection-cap values (issue 23) with a real helm."""

from __future__ import annotations

from tests.deploy.conftest import NAMESPACE, RELEASE

TLS = ("--set", "tls.enabled=true", "--set", "tls.certManager.enabled=true",
       "--set", "tls.certManager.issuerRef.name=internal-ca",
       "--set", "tls.certManager.issuerRef.kind=ClusterIssuer")


def _container(r) -> dict:
    return r.one("Deployment")["spec"]["template"]["spec"]["containers"][0]


def test_tls_with_cert_manager(render):
    r = render(*TLS)
    c = _container(r)
    assert {"--tls-cert=/etc/ringmaster/tls/tls.crt", "--tls-key=/etc/ringmaster/tls/tls.key",
            "--tls-ca=/etc/ringmaster/tls/ca.crt"} <= set(c["args"])
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["scheme"] == "HTTPS"
    mount = next(m for m in c["volumeMounts"] if m["name"] == "tls")
    assert mount == {"name": "tls", "mountPath": "/etc/ringmaster/tls", "readOnly": True}
    volumes = r.one("Deployment")["spec"]["template"]["spec"]["volumes"]
    secret = next(v for v in volumes if v["name"] == "tls")["secret"]
    cert = r.one("Certificate")
    assert secret["secretName"] == cert["spec"]["secretName"] == f"{RELEASE}-ringmaster-tls"
    # Workers reach the controller at <fullname>.<namespace>.svc:<grpc port>.
    assert f"{RELEASE}-ringmaster.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]
    assert cert["spec"]["issuerRef"] == {"name": "internal-ca", "kind": "ClusterIssuer",
                                         "group": "cert-manager.io"}


def test_tls_with_an_existing_secret_and_no_ca(render):
    r = render("--set", "tls.enabled=true", "--set", "tls.secretName=my-cert",
               "--set", "tls.caKey=")
    args = _container(r)["args"]
    assert "--tls-cert=/etc/ringmaster/tls/tls.crt" in args
    assert not any(a.startswith("--tls-ca") for a in args)
    assert r.of_kind("Certificate") == []


def test_tls_misconfigurations_fail_the_render(render):
    for args, fragment in (
            (("--set", "tls.enabled=true"), "set tls.secretName"),
            (("--set", "tls.certManager.enabled=true"), "tls.enabled is false"),
            (("--set", "tls.enabled=true", "--set", "tls.certManager.enabled=true"),
             "issuerRef.name")):
        r = render(*args)
        assert r.rc != 0 and fragment in r.err, r.err


def test_without_tls_nothing_changes(render):
    c = _container(render())
    assert not any(a.startswith("--tls") for a in c["args"])
    assert "scheme" not in c["readinessProbe"]["httpGet"]


def test_data_roots_and_connection_cap(render):
    args = _container(render("--set", "controller.dataRoots={/data,/models}",
                             "--set", "controller.maxConnections=200"))["args"]
    assert "--data-root=/data" in args and "--data-root=/models" in args
    assert "--max-connections=200" in args
    assert render("--set", "controller.dataRoots={relative}").rc != 0  # absolute paths only
