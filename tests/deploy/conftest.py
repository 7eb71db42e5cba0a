"""Fixtures for the chart tests: a real Helm binary and rendered manifests.

`helm` comes from deploy/get-helm.sh (PATH, else a pinned, sha256-checked download cached
under .cache/helm). Renders are cached per session: the chart is rendered once per
ci/*-values.yaml, and ad-hoc renders (`render(...)`) cost one helm call each (~0.1 s).
"""

from __future__ import annotations

import functools
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "ringmaster"
VARIANTS = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "rm", "ml"


@dataclass(frozen=True)
class Render:
    """The result of one `helm template`."""

    rc: int
    text: str  # stdout (the manifests)
    err: str  # stderr (schema and `fail` messages)

    @functools.cached_property
    def objects(self) -> list[dict]:
        assert self.rc == 0, self.err
        return [d for d in yaml.safe_load_all(self.text) if d]

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} named {name!r}"
        return found[0]


@pytest.fixture(scope="session")
def helm() -> str:
    try:
        out = subprocess.run([str(REPO / "deploy" / "get-helm.sh")], check=True,
                             capture_output=True, text=True, timeout=300)
    except subprocess.CalledProcessError as exc:
        pytest.fail(f"deploy/get-helm.sh failed: {exc.stderr}")
    return out.stdout.strip()


@pytest.fixture(scope="session")
def render(helm):
    """render(*args, values_file=None) -> Render of `helm template rm CHART -n ml ...`."""

    @functools.cache
    def _render(*args: str, values_file: str | None = None) -> Render:
        cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
        if values_file:
            cmd += ["-f", str(CHART / "ci" / f"{values_file}-values.yaml")]
        proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)
        return Render(rc=proc.returncode, text=proc.stdout, err=proc.stderr)

    return _render


@pytest.fixture(scope="session", params=VARIANTS)
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def rendered(render, variant) -> Render:
    return render(values_file=variant)
