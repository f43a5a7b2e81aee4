"""The command line's manners: --version, completion, help examples, --quiet, --json-log, plain logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import GLOBAL_TIES_READS, toy_family, write_recipe
from neuromerge_cli import __version__
from neuromerge_cli.cli import app


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return toy_family(tmp_path_factory.mktemp("family"), 2)


def _recipe(family, tmp_path: Path, method: str = "ties") -> Path:
    base, tasks = family
    return write_recipe(tmp_path / "r.yaml", base, tasks, method, {"density": 0.5} if method == "ties" else None,
                        tmp_path / "out")


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"neuromerge {__version__}"


def test_every_command_has_an_example() -> None:
    names = [c.name or c.callback.__name__ for c in app.registered_commands]  # type: ignore[union-attr]
    assert {"run", "push", "report", "validate", "methods", "inspect"} <= set(names)
    for name in names:
        result = CliRunner().invoke(app, [name, "--help"])
        assert result.exit_code == 0, name
        assert "Example:" in result.stdout, f"`neuromerge {name} --help` shows no example"
        example = result.stdout.split("Example:", 1)[1].strip().splitlines()[0].strip()
        assert example.startswith(f"neuromerge {name}"), (name, example)


def test_shell_completion_script(monkeypatch: pytest.MonkeyPatch) -> None:
    # the shell is named, not detected from the parent processes (none is a shell under some launchers)
    monkeypatch.setenv("_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION", "1")
    result = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name="neuromerge")
    assert result.exit_code == 0, result.output
    assert "complete" in result.stdout and "_NEUROMERGE_COMPLETE" in result.stdout


@pytest.mark.parametrize("args, env, shows", [
    (["--help"], {}, "Usage: neuromerge"),
    (["run", "--help"], {}, "Usage: neuromerge run"),
    ([], {"_NEUROMERGE_COMPLETE": "complete_bash", "COMP_WORDS": "neuromerge r", "COMP_CWORD": "1"}, "run"),
])
def test_help_and_completion_load_no_torch(args: list[str], env: dict[str, str], shows: str) -> None:
    # importing torch takes over a second: help and every TAB of shell completion would wait for it
    code = ("import sys\nfrom neuromerge_cli.cli import app\ntry:\n    app(sys.argv[1:], prog_name='neuromerge')\n"
            "except SystemExit:\n    pass\nsys.stderr.write(f'torch loaded: {\"torch\" in sys.modules}')")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.stderr.endswith("torch loaded: False"), result.stderr
    assert shows in result.stdout


def test_quiet_prints_nothing(family, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(_recipe(family, tmp_path)), "--quiet"])
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""
    assert (tmp_path / "out" / "merge_report.json").exists()


def test_plain_progress_lines_when_not_a_terminal(family, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(_recipe(family, tmp_path))])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    starts = [line for line in lines if line.endswith("to read")]
    ends = [line for line in lines if ": done, " in line]
    reads = GLOBAL_TIES_READS
    assert [s.split(":")[0] for s in starts] == [e.split(":")[0] for e in ends] == [
        *(f"statistics pass {g}/{reads}" for g in range(1, reads + 1)), "merge"]
    assert "\x1b" not in result.stderr and "\r" not in result.stderr  # no terminal control in logs
    assert "method ties" in result.stdout and f"wrote {tmp_path / 'out'}" in result.stdout


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuromerge_cli", *args], capture_output=True, text=True, timeout=300)


def test_the_command_keeps_exit_codes_and_flushes_its_output_when_it_skips_teardown(tmp_path: Path) -> None:
    """main() ends the process with os._exit: the exit codes and everything printed must survive."""
    from neuromerge_cli.methods import METHODS

    ok = _cli("methods")  # a long listing, to a pipe: all of it must arrive
    assert ok.returncode == 0 and all(f"{name}: " in ok.stdout for name in METHODS)
    missing = _cli("run", str(tmp_path / "none.yaml"))
    assert missing.returncode == 1 and "no such recipe file" in missing.stderr
    usage = _cli("run", "--no-such-option")
    assert usage.returncode == 2 and "No such option" in usage.stderr


def test_json_log_is_json_only(family, tmp_path: Path) -> None:
    proc = _cli("run", str(_recipe(family, tmp_path)), "--json-log")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines()]  # every line parses
    kinds = [e["event"] for e in events]
    assert kinds.count("pass_start") == kinds.count("pass_end") == GLOBAL_TIES_READS + 1  # and the merge
    assert kinds[-1] == "summary"
    summary = events[-1]
    assert summary["output"] == str(tmp_path / "out") and summary["method"] == "ties"
    assert len(summary["tasks"]) == 2 and "sigma" in summary["tasks"][0]
    merge_end = next(e for e in events if e["event"] == "pass_end" and e["phase"] == "merge")
    assert merge_end["bytes_done"] == merge_end["bytes_total"] > 0
    assert "method ties" in proc.stdout  # the human summary still goes to stdout


def test_json_log_error_event(family, tmp_path: Path) -> None:
    recipe = _recipe(family, tmp_path)
    recipe.write_text(recipe.read_text() + "extra_key: 1\n")
    result = CliRunner().invoke(app, ["run", str(recipe), "--json-log"])
    assert result.exit_code == 1
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert [e["event"] for e in events] == ["error"]
    assert events[0]["message"].startswith("extra_key: unknown key") and events[0]["exit_code"] == 1
    assert result.stdout == ""


def test_plain_error_is_one_line(family, tmp_path: Path) -> None:
    recipe = _recipe(family, tmp_path)
    recipe.write_text(recipe.read_text() + "extra_key: 1\n")
    result = CliRunner().invoke(app, ["run", str(recipe)])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: extra_key: unknown key")
