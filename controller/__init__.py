"""Control plane: job spec, REST API, CLI, Redis job store, job state machine, launchers.

Public surface (imported on first use, so `import controller.rpc` from a worker stays light):
`RingmasterClient`/`ApiError` (typed REST client), `JobCreate`/`load_job_spec` (the job
spec), `State` (job states), `Launcher`/`LauncherEvent`/`FakeLauncher` (how workers start),
`JobStore`, `JobStateMachine`, `Controller`/`ControllerConfig` (one controller process).
"""

_LAZY = {
    "RingmasterClient": "controller.client", "ApiError": "controller.client",
    "JobCreate": "controller.spec", "load_job_spec": "controller.spec",
    "State": "controller.states", "JobRecord": "controller.states",
    "Launcher": "controller.launchers.base", "LauncherEvent": "controller.launchers.base",
    "EventKind": "controller.launchers.base", "FakeLauncher": "controller.launchers.base",
    "JobStore": "controller.store", "StepMetrics": "controller.store",
    "JobStateMachine": "controller.machine",
    "Controller": "controller.server", "ControllerConfig": "controller.server",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'controller' has no attribute {name!r}")
