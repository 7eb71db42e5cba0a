"""Launchers start and stop job worker groups; config selects one by name.

`make_launcher("ray" | "kuberay" | "external" | "fake", **options)` imports the
implementation lazily so the controller only loads the client libraries of the launcher it
uses. "kubernetes" is
the older name of "kuberay" (one KubeRay RayCluster per job attempt) and still accepted.
"""

from __future__ import annotations

import importlib

from controller.launchers.base import (
    EventKind,
    FakeLauncher,
    Launcher,
    LauncherEvent,
    StandbyLauncher,
)

LAUNCHERS: dict[str, tuple[str, str]] = {
    "ray": ("controller.launchers.ray", "RayLauncher"),
    "kuberay": ("controller.launchers.kubernetes", "KubernetesLauncher"),
    "kubernetes": ("controller.launchers.kubernetes", "KubernetesLauncher"),
    "external": ("controller.launchers.external", "ExternalLauncher"),
    "fake": ("controller.launchers.base", "FakeLauncher"),
}


def make_launcher(name: str, **options) -> Launcher:
    """The launcher called `name`, built with `options` (its constructor's keywords)."""
    if name not in LAUNCHERS:
        raise ValueError(f"launcher={name!r} is not known; valid: {', '.join(LAUNCHERS)}")
    module_name, class_name = LAUNCHERS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"launcher={name!r} is not available in this installation "
                         f"({module_name}: {exc})") from None
    return getattr(module, class_name)(**options)


KUBERAY_NAMES = frozenset({"kuberay", "kubernetes"})


__all__ = ["EventKind", "FakeLauncher", "KUBERAY_NAMES", "LAUNCHERS", "Launcher",
           "LauncherEvent", "StandbyLauncher", "make_launcher"]
