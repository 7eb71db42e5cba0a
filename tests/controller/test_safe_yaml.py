"""Hostile and broken job-spec files (issue 23): each is one short error line, promptly,
in bounded memory, from the library and from the CLI; never a traceback.

The bombs are the probe's: 5,000 levels of nesting (a RecursionError traceback before), a
~600-byte "billion laughs" (ran past 60 s), a smaller alias bomb (a 58 MB error message
using 416 MB) and duplicate keys (silently kept the last).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import pytest

from controller.safe_yaml import MAX_MESSAGE_CHARS, YamlError, load_yaml
from controller.spec import load_job_spec
from scheduler.errors import SpecError

VALID = """name: demo
model: tiny
dataset: {path: /d}
resources: {num_ranks: 2}
training: {steps: 3, global_batch_tokens: 64, learning_rate: 3e-4}
"""


def laughs(levels: int, fanout: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * fanout)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return VALID + "\n".join(lines) + "\n"


BOMBS = {
    "deep-flow": "name: [" + "[" * 5000 + "]" * 5000 + "]\n",
    "deep-block": "name:\n" + "".join(" " * i + "- \n" for i in range(1, 3000)),
    "billion-laughs": laughs(9, 9),
    "small-laughs": laughs(5, 6),
    "merge-alias": VALID + "base: &b {x: 1}\nother:\n  <<: *b\n",
    "duplicate-key": VALID + "name: other\n",
    "duplicate-nested": VALID.replace("{path: /d}", "{path: /d, path: /e}"),
    "huge": VALID + "pad: '" + "x" * (2 << 20) + "'\n",
    "unclosed": "name: [demo\n",
    "tab-indent": "name: demo\n\tmodel: tiny\n",
    "binary": "name: \x00\x01\x02\n",
    "yes-as-int": VALID.replace("num_ranks: 2", "num_ranks: yes"),
    "quoted-int": VALID.replace("num_ranks: 2", 'num_ranks: "2"'),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(BOMBS))
def test_bad_files_are_one_short_line_in_bounded_memory(tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(BOMBS[name])
    tracemalloc.start()
    try:
        with pytest.raises(SpecError) as err:
            load_job_spec(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert "\n" not in message and len(message) <= 2000, message[:300]
    assert peak < 40 * 2**20, f"{peak / 2**20:.0f} MiB"  # the file itself is at most 2 MiB
    assert str(path) in message


def test_what_each_refusal_says():
    with pytest.raises(YamlError, match=r"aliases are not allowed \(\*a0 at line 7"):
        load_yaml(laughs(3, 2))
    with pytest.raises(YamlError, match="nested deeper than 64 levels"):
        load_yaml(BOMBS["deep-flow"])
    with pytest.raises(YamlError, match=r"duplicate key 'name' at line 6 column 1 \(first "
                                        r"at line 1 column 1\)"):
        load_yaml(BOMBS["duplicate-key"])
    with pytest.raises(YamlError, match="over 1048576 bytes"):
        load_yaml(BOMBS["huge"])
    long = YamlError("x " * 10_000)
    assert len(str(long)) == MAX_MESSAGE_CHARS and str(long).endswith("...")


def test_valid_specs_still_load_with_yaml_12_floats(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(VALID)
    spec = load_job_spec(path)
    assert spec.training.learning_rate == pytest.approx(3e-4)
    assert spec.resources.num_ranks == 2


def test_json_specs_refuse_duplicates_and_nan(tmp_path):
    for text, fragment in (('{"name": "a", "name": "b"}', "duplicate key 'name'"),
                           ('{"name": NaN}', "NaN is not a JSON number"),
                           ("[" * 100_000 + "]" * 100_000, "nested")):
        path = tmp_path / "spec.json"
        path.write_text(text)
        with pytest.raises(SpecError, match=fragment):
            load_job_spec(path)


@pytest.mark.parametrize("name", ["deep-flow", "billion-laughs", "duplicate-key", "huge"])
def test_the_cli_prints_one_line_and_exits_2(tmp_path, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(BOMBS[name])
    env = {**os.environ, "RINGMASTER_URL": "http://127.0.0.1:9", "RINGMASTER_TOKEN": "t"}
    proc = subprocess.run([sys.executable, "-c", "from controller.cli import main; main()",
                           "submit", str(path)], capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and len(lines[0]) < 2200
