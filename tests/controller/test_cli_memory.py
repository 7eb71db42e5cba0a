"""`ringmaster memory`: JSON figures agree with the planner; mistakes are one line, exit 2."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from controller.cli import app
from scheduler.memory_model import find_profile, plan_model
from scheduler.specs import model_preset

runner = CliRunner()


def test_json_figures_match_the_planner():
    result = runner.invoke(app, ["memory", "--model", "tiny", "--tokens", "4099", "--layers",
                                 "3", "--output", "json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    spec = model_preset("tiny").model_copy(update={"num_layers": 3})
    plan = plan_model(find_profile(spec), 4099, num_layers=3)
    assert figures["planned_peak_bytes"] == plan.peak_bytes
    assert figures["model_max_live_bytes"] == plan.unrolled_max_live_bytes
    assert figures["planned_peak_bytes"] <= figures["caching_allocator_reserved_bytes"]


def test_table_output_and_user_mistakes():
    ok = runner.invoke(app, ["memory", "--model", "tiny", "--tokens", "128"])
    assert ok.exit_code == 0 and "planned_peak" in ok.output
    bad = runner.invoke(app, ["memory", "--model", "tiny", "--tokens", "0"])
    assert bad.exit_code == 2 and "--tokens 0" in bad.output
    unknown = runner.invoke(app, ["memory", "--model", "nope"])
    assert unknown.exit_code == 2 and "model='nope'" in unknown.output
