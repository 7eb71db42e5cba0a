"""The foundation commands of the `ringmaster` CLI, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from scheduler.dataset import TokenDataset


def ringmaster(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", "from controller.cli import main; main()",
                           *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_help_lists_commands():
    out = ringmaster("--help").stdout
    for cmd in ("demo", "schema", "data"):
        assert cmd in out


@pytest.mark.parametrize("kind,field", [("plan", "capacity_tokens"), ("model", "num_kv_heads"),
                                        ("cluster", "pcie_bandwidth_gbps")])
def test_schema(kind, field):
    schema = json.loads(ringmaster("schema", kind).stdout)
    assert field in json.dumps(schema)


def test_data_synth(tmp_path):
    out = ringmaster("data", "synth", "--distribution", "byted", "--num-samples", "300",
                     "--max-length", "8192", "--out", str(tmp_path), "--seed", "3").stdout
    assert "share_long" in out
    assert len(TokenDataset(tmp_path)) == 300


def test_data_synth_bad_distribution_is_one_line(tmp_path):
    proc = ringmaster("data", "synth", "--distribution", "zipf", "--out", str(tmp_path),
                      check=False)
    assert proc.returncode == 2
    assert "distribution='zipf'" in proc.stderr and "Traceback" not in proc.stderr


def test_data_import_missing_file(tmp_path):
    proc = ringmaster("data", "import", str(tmp_path / "none.jsonl"), "--out", str(tmp_path),
                      check=False)
    assert proc.returncode == 2 and "none.jsonl: file not found" in proc.stderr


@pytest.mark.parametrize("args,literal", [
    (["memory", "--model", "[bold]nope[/bold]"], "model='[bold]nope[/bold]'"),
    (["plan", "--lengths", "{tmp}/[red]l[/red].txt", "--model", "tiny", "--cluster", "cpu",
      "--ranks", "2"], "[red]l[/red].txt: file not found"),
    (["data", "import", "{tmp}/[red]rows[/red].jsonl", "--out", "{tmp}/out"],
     "[red]rows[/red].jsonl: file not found"),
    (["data", "stats", "{tmp}/[red]none[/red]"], "[red]none[/red].idx"),
    (["submit", "{tmp}/[red]spec[/red].yaml", "--url", "http://127.0.0.1:9"],
     "[red]spec[/red].yaml: file not found"),
])
def test_errors_print_what_the_user_typed_literally(tmp_path, args, literal):
    # Every command group reports through one printer (controller/cli_errors.py) that
    # escapes rich markup: a value that looks like a markup tag is shown as typed.
    from typer.testing import CliRunner

    from controller.cli import app

    res = CliRunner().invoke(app, [a.replace("{tmp}", str(tmp_path)) for a in args])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith("error: ") and literal in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
