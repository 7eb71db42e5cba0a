"""The driver's exit codes are defined once (scheduler/driver_exit.py) and used by both
sides: the driver that exits with them and the launchers that read them back."""

from __future__ import annotations

import ast
from pathlib import Path

from scheduler import driver_exit

ROOT = Path(__file__).resolve().parents[2]


def _exit_constants(path: Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names += [n.id for t in targets for n in ast.walk(t)
                      if isinstance(n, ast.Name) and n.id.startswith("EXIT_")]
    return names


def test_exit_codes_are_defined_in_one_module_only():
    found = {str(p.relative_to(ROOT)): names
             for pkg in ("controller", "scheduler", "workers")
             for p in sorted((ROOT / pkg).rglob("*.py")) if (names := _exit_constants(p))}
    assert found == {"scheduler/driver_exit.py": ["EXIT_OK", "EXIT_LOST", "EXIT_FAILED"]}


def test_codes_are_distinct_and_success_is_zero():
    codes = (driver_exit.EXIT_OK, driver_exit.EXIT_LOST, driver_exit.EXIT_FAILED)
    assert driver_exit.EXIT_OK == 0 and len(set(codes)) == 3
