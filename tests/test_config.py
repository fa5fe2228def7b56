"""Run configuration: validation, overrides and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scalesim.config import ConfigError, import_world_class, load_config, parse_override

GOOD = """\
world:
  class: tests.tiny_world:Pingers
  params: {agents: 2}
sim: {until: 10, seed: 1}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "world.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, overrides=None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        import_world_class(load_config(path, overrides))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_good_file_loads_with_defaults(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.world.cls == "tests.tiny_world:Pingers"
    assert config.runtime.executor == "hf" and config.runtime.model == "smollm2-135m"
    assert config.sim.until == 10 and config.sim.seed == 1
    assert import_world_class(config).__name__ == "Pingers"


def test_overrides_reach_nested_keys(tmp_path):
    overrides = dict(parse_override(s) for s in ["sim.seed=5", "world.params.agents=4",
                                                 "output.progress=false"])
    config = load_config(write(tmp_path, GOOD), overrides)
    assert config.sim.seed == 5 and config.world.params["agents"] == 4
    assert config.output.progress is False


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD + "runtime: {executr: hf}\n", "runtime.executr: unknown key"),
        (GOOD.replace("seed: 1", "seed: one"), "sim.seed:"),
        (GOOD + "runtime: {executor: warp}\n", "runtime.executor:"),
        ("sim: {until: 3}\n", "world: required key is missing"),
        (GOOD.replace("until: 10", "until: -1"), "sim.until:"),
        ("world: [1, 2\n", "line"),
        ("- just\n- a list\n", "top level must be a mapping"),
        (GOOD.replace("tests.tiny_world:Pingers", "tests.nowhere:Pingers"),
         "world.class: cannot import 'tests.nowhere'"),
        (GOOD.replace("Pingers", "Nope"), "world.class: tests.tiny_world has no World subclass"),
        (GOOD.replace("tests.tiny_world:Pingers", "justamodule"), "world.class: expected"),
        (GOOD.replace("{agents: 2}", "{agnets: 2}"), "world.params.agnets: Pingers.setup"),
        (GOOD.replace("Pingers", "NeedsParam").replace("{agents: 2}", "{}"),
         "world.params.size: required parameter"),
        (GOOD.replace("{agents: 2}", "{agents: many}"), "world.params.agents: Input should be"),
    ],
)
def test_bad_input_names_the_key_and_file(tmp_path, text, expected):
    message = error_of(tmp_path, text)
    assert expected in message
    assert "world.yaml" in message


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found: .*absent.yaml"):
        load_config(tmp_path / "absent.yaml")


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        parse_override("sim.until")


def test_unknown_model_is_a_config_error(tmp_path):
    from scalesim.run import main

    path = write(tmp_path, GOOD + "runtime: {model: /no/such/model}\n")
    assert main([str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scalesim.run", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("text", ["world: {class: [oops\n", GOOD + "sim: {until: soon}\n",
                                  GOOD.replace("Pingers", "Missing")])
def test_cli_prints_one_line_and_exits_2(tmp_path, text):
    path = write(tmp_path, text)
    done = run_cli(str(path), cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "world.yaml" in lines[0]
    assert "Traceback" not in done.stderr


def test_cli_missing_file_exits_2(tmp_path):
    done = run_cli(str(tmp_path / "nope.yaml"), cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2 and "nope.yaml" in done.stderr
