"""Static checks of deploy/Dockerfile (no Docker engine here, so it is read, not built).

What they hold: both targets exist, the worker sits on the CUDA_BASE build arg, images
run as the UID the chart and the RayCluster pods expect, bases are pinned, every COPY
source exists and survives the .dockerignore allowlist.
"""

from __future__ import annotations

import fnmatch
import re

import yaml

from controller.launchers.kuberay import ClusterSettings
from tests.deploy.conftest import CHART, REPO

DOCKERFILE = (REPO / "deploy" / "Dockerfile").read_text()
IGNORE = (REPO / "deploy" / "Dockerfile.dockerignore").read_text()


def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages, current = {}, None
    for word, rest in _instructions():
        if word == "FROM":
            current = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            stages[current] = [(word, rest)]
        elif current is not None:
            stages[current].append((word, rest))
    return stages


def test_targets_and_cuda_base_arg():
    stages = _stages()
    assert {"controller", "worker"} <= stages.keys()
    assert stages["worker"][0][1].startswith("${CUDA_BASE}")
    args = {rest.split("=")[0]: rest.split("=", 1)[1] for word, rest in _instructions()
            if word == "ARG" and "=" in rest}
    assert args["CUDA_BASE"].startswith("nvidia/cuda:")
    for name in ("PYTHON_BASE", "CUDA_BASE"):
        assert ":" in args[name] and not args[name].endswith(":latest"), name


def test_final_images_run_as_the_uid_the_chart_uses():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    uid = values["controller"]["runAsUser"]
    assert uid == ClusterSettings(image="i:1", ray_version="2", controller_address="c:1",
                                  owner="o").run_as_user
    for target in ("controller", "worker"):
        users = [rest for word, rest in _stages()[target] if word == "USER"]
        assert users == [f"{uid}:{uid}"], target


def test_controller_default_command_matches_the_chart():
    cmd = [rest for word, rest in _stages()["controller"] if word == "CMD"][0]
    assert '"ringmaster", "serve"' in cmd and "--grpc-port=50051" in cmd


def _ignored(path: str) -> bool:
    ignored = False
    for pattern in IGNORE.splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def test_copy_sources_exist_and_are_in_the_build_context():
    sources = []
    for word, rest in _instructions():
        if word == "COPY" and "--from" not in rest:
            sources += rest.split()[:-1]
    assert "pyproject.toml" in sources and "controller" in sources
    for src in sources:
        assert (REPO / src).exists(), src
        assert not _ignored(src), src
    assert _ignored(".venv") and _ignored(".cache/helm") and _ignored("tests")
