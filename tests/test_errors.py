"""The catalogue of bad inputs (docs/errors.md): each ends in one clear line, a non-zero exit, and no trace on disk.

Every case builds its broken input in its own folder, runs `neuromerge run` on it, and checks: exactly one
line on stderr, in the documented shape, naming the file, key or tensor at fault; exit code 1; no traceback;
and the case folder byte-for-byte as it was (no output folder, no temporary folder, no created parents).
Every case runs in-process through the CLI; the cases marked ``sub`` also run as a real
``python -m neuromerge_cli`` subprocess (a few at a time: each subprocess pays the torch import).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from typer.testing import CliRunner

from helpers import fine_tune, toy_family, toy_tensors, write_model
from neuromerge_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs" / "errors.md"


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Path], list[str]]  # makes the broken input in a folder; returns the args after `run`
    pattern: str  # regex the stderr line must match (after "error: ")
    shape: str  # the message shape as docs/errors.md shows it
    sub: bool = False  # also run it as a real subprocess
    env: dict[str, str] = field(default_factory=dict)


# -- builders -----------------------------------------------------------------------------------------


def family(d: Path, num_tasks: int = 2, shards: int = 1) -> tuple[Path, list[Path]]:
    return toy_family(d, num_tasks, shards=shards)


def recipe_args(d: Path, base: Path | str, tasks: list, method: str = "ties", parameters: dict | None = None,
                **extra: object) -> list[str]:
    """A recipe in d/recipe.yaml writing to d/merged; returns the CLI args."""
    extra.setdefault("output", str(d / "merged"))
    data: dict = {"base_model": str(base), "models": [{"model": str(t)} for t in tasks], "method": method}
    if parameters:
        data["parameters"] = parameters
    data.update({k: v for k, v in extra.items() if v is not None})
    (d / "recipe.yaml").write_text(yaml.safe_dump(data))
    return [str(d / "recipe.yaml"), "-q"]


def text_recipe(text: str) -> Callable[[Path], list[str]]:
    def build(d: Path) -> list[str]:
        (d / "recipe.yaml").write_text(text)
        return [str(d / "recipe.yaml"), "-q"]
    return build


def good_recipe(method: str = "ties", parameters: dict | None = None, **extra: object) -> Callable[[Path], list[str]]:
    """A valid family with a recipe that differs from a good one only by ``parameters``/``extra``."""
    def build(d: Path) -> list[str]:
        base, tasks = family(d)
        return recipe_args(d, base, tasks, method, parameters, **extra)
    return build


def with_args(build: Callable[[Path], list[str]], *args: str) -> Callable[[Path], list[str]]:
    return lambda d: build(d) + list(args)


def edit_model(edit: Callable[[dict[str, torch.Tensor]], None], config: dict | None = None
               ) -> Callable[[Path], list[str]]:
    """A family whose first task's tensors (and config) are edited."""
    def build(d: Path) -> list[str]:
        base, tasks = family(d)
        tensors = fine_tune(toy_tensors(0), 0)
        edit(tensors)
        shutil.rmtree(tasks[0])
        write_model(tasks[0], tensors, config=config)
        return recipe_args(d, base, tasks)
    return build


def edit_file(name: str, edit: Callable[[Path], None], task: int = 0, shards: int = 1) -> Callable[[Path], list[str]]:
    """A family where file ``name`` of one task (``base`` when task is -1) is damaged by ``edit``."""
    def build(d: Path) -> list[str]:
        base, tasks = family(d, shards=shards)
        edit((base if task < 0 else tasks[task]) / name)
        return recipe_args(d, base, tasks)
    return build


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-10])


def garble_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8:20] = b"\xff" * 12
    path.write_bytes(bytes(data))


def huge_header_length(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**40) + data[8:])


def complex_tensor(path: Path) -> None:
    """Rewrite a safetensors file with one extra complex64 tensor (valid format, unsupported dtype)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    header["phase"] = {"dtype": "C64", "shape": [2], "data_offsets": [end, end + 16]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:] + bytes(16))


def set_value(name: str, value: float, task: int | None = 0, output: str = "merged") -> Callable[[Path], list[str]]:
    """A family where one entry of ``name`` in a task (or the base when task is None) is NaN or Inf."""
    def build(d: Path) -> list[str]:
        base, tasks = family(d)
        target = base if task is None else tasks[task]
        tensors = fine_tune(toy_tensors(0), task) if task is not None else toy_tensors(0)
        tensors[name].view(-1)[3] = value
        shutil.rmtree(target)
        write_model(target, tensors)
        return recipe_args(d, base, tasks, output=str(d / output))
    return build


class NeedsCode:
    """Pickled into a .bin: loading it would run this module's code."""

    def __init__(self) -> None:
        self.payload = "anything"


def bin_file(content: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def build(d: Path) -> list[str]:
        base, tasks = family(d)
        (tasks[0] / "model.safetensors").unlink()
        content(tasks[0] / "pytorch_model.bin")
        return recipe_args(d, base, tasks)
    return build


def pickled_object(path: Path) -> None:
    torch.save({**fine_tune(toy_tensors(0), 0), "extra_state": NeedsCode()}, path)


def random_bytes(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 4)


def vocab_family(d: Path) -> list[str]:
    tensors = {"model.embed_tokens.weight": torch.randn(20, 8), "model.layers.0.weight": torch.randn(8, 8)}
    base = write_model(d / "base", tensors)
    task = fine_tune(tensors, 0)
    task["model.embed_tokens.weight"] = torch.randn(24, 8)
    return recipe_args(d, base, [write_model(d / "task0", task)])


def missing_shard(d: Path) -> list[str]:
    base, tasks = family(d, shards=2)
    (tasks[0] / "model-00002-of-00002.safetensors").unlink()
    return recipe_args(d, base, tasks)


def base_other_spelling(d: Path) -> list[str]:
    base, tasks = family(d)
    return recipe_args(d, base, [f"{base}/", tasks[0]])


def output_exists(d: Path) -> list[str]:
    args = good_recipe()(d)
    (d / "merged").mkdir()
    (d / "merged" / "model.safetensors").write_bytes(b"previous output")
    return args


def output_is_file(d: Path) -> list[str]:
    args = good_recipe()(d)
    (d / "merged").write_text("a file")
    return args + ["--overwrite"]


def output_under_a_file(d: Path) -> list[str]:
    args = good_recipe(output=str(d / "a-file" / "merged"))(d)
    (d / "a-file").write_text("not a folder")
    return args


def output_in_input(d: Path) -> list[str]:
    base, tasks = family(d)
    return recipe_args(d, base, tasks, output=str(tasks[1] / "merged"))


def hub_offline(d: Path) -> list[str]:
    base, tasks = family(d)
    (d / "hub-cache").mkdir()
    return recipe_args(d, base, ["someorg/not-cached-model"])


def missing_folder(d: Path) -> list[str]:
    base, tasks = family(d)
    return recipe_args(d, base, [tasks[0], d / "no-such-model"])


def not_a_folder(d: Path) -> list[str]:
    base, tasks = family(d)
    return recipe_args(d, base, [tasks[0] / "model.safetensors"])


def no_weights(d: Path) -> list[str]:
    base, tasks = family(d)
    (tasks[0] / "model.safetensors").unlink()
    return recipe_args(d, base, tasks)


def bad_config(d: Path) -> list[str]:
    base, tasks = family(d)
    (tasks[0] / "config.json").write_text("{not json")
    return recipe_args(d, base, tasks)


def no_output(d: Path) -> list[str]:
    return recipe_args(d, *family(d), output=None)


def same_as_base(d: Path) -> list[str]:
    base, tasks = family(d)
    return recipe_args(d, base, [tasks[0], base])


def drop(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.pop(name)


def add(name: str, value: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda t: t.__setitem__(name, value)


P = r"\S*"  # a path
CASES = [
    # -- the recipe ---------------------------------------------------------------------------------------
    Case("recipe_missing", lambda d: [str(d / "nope.yaml")], rf"{P}nope\.yaml: no such recipe file$",
         "`<recipe>: no such recipe file`"),
    Case("malformed_yaml", text_recipe("base_model: [unclosed\nmethod: ties\n"),
         rf"{P}recipe\.yaml: malformed YAML at line \d+, column \d+: .+",
         "`<recipe>: malformed YAML at line L, column C: <problem>`", sub=True),
    Case("empty_recipe", text_recipe("# nothing\n"), rf"{P}recipe\.yaml: the recipe is empty .+",
         "`<recipe>: the recipe is empty (expected a mapping with keys base_model, models, method)`"),
    Case("recipe_not_mapping", text_recipe("- base_model: a\n- models: [b]\n"),
         rf"{P}recipe\.yaml: expected a mapping of keys \(.+\), got list$",
         "`<recipe>: expected a mapping of keys (...), got list`"),
    Case("missing_key", text_recipe("base_model: a\nmodels: [b]\n"), r"method: missing \(required keys: .+\)$",
         "`method: missing (required keys: base_model, models, method)`"),
    Case("unknown_key", good_recipe(modles=["x"]),
         r"modles: unknown key \(did you mean 'models'\? allowed: base_model, models, .+\)$",
         "`modles: unknown key (did you mean 'models'? allowed: ...)`"),
    Case("unknown_model_key", text_recipe("base_model: a\nmodels: [{model: b, wieght: 2}]\nmethod: ties\n"),
         r"models\[0\]\.wieght: unknown key \(did you mean 'weight'\? allowed: model, weight\b.*\)$",
         "`models[0].wieght: unknown key (did you mean 'weight'? allowed: model, weight, ...)`"),
    Case("models_wrong_type", text_recipe("base_model: a\nmodels: b\nmethod: ties\n"),
         r"models: expected a non-empty list of .+", "`models: expected a non-empty list of {model: PATH_OR_ID, weight: NUMBER}`"),
    Case("weight_wrong_type", text_recipe("base_model: a\nmodels: [{model: b, weight: heavy}]\nmethod: ties\n"),
         r"models\[0\]\.weight: expected a number, got 'heavy'$", "`models[0].weight: expected a number, got 'heavy'`"),
    Case("weight_not_finite", text_recipe("base_model: a\nmodels: [{model: b, weight: .inf}]\nmethod: ties\n"),
         r"models\[0\]\.weight: expected a finite number, got inf$", "`models[0].weight: expected a finite number, got inf`"),
    Case("weight_not_positive", text_recipe("base_model: a\nmodels: [{model: b, weight: -1}]\nmethod: ties\n"),
         r"models\[0\]\.weight: method 'ties' needs a weight > 0, got -1$",
         "`models[0].weight: method 'ties' needs a weight > 0, got -1`"),
    Case("parameter_wrong_type", good_recipe(parameters={"density": "high"}),
         r"parameters\.density: expected a number, got 'high'$", "`parameters.density: expected a number, got 'high'`"),
    Case("unknown_method", good_recipe("tiez"), r"method: unknown method 'tiez' \(did you mean 'ties'\? known: .+\)$",
         "`method: unknown method 'tiez' (did you mean 'ties'? known: ...)`"),
    Case("unknown_parameter", good_recipe(parameters={"densty": 0.5}),
         r"parameters\.densty: method 'ties' takes no parameter 'densty' \(did you mean 'density'\? allowed: .+\)$",
         "`parameters.densty: method 'ties' takes no parameter 'densty' (did you mean 'density'? allowed: ...)`", sub=True),
    Case("parameter_not_taken", good_recipe("task_arithmetic", parameters={"density": 0.5}),
         r"parameters\.density: method 'task_arithmetic' takes no parameter 'density' \(allowed: lambda\)$",
         "`parameters.density: method 'task_arithmetic' takes no parameter 'density' (allowed: lambda)`"),
    Case("density_zero", good_recipe(parameters={"density": 0}), r"parameters\.density: must be > 0, got 0$",
         "`parameters.density: must be > 0, got 0`"),
    Case("density_above_one", good_recipe("dare_ties", parameters={"density": 1.5}),
         r"parameters\.density: must be <= 1, got 1\.5$", "`parameters.density: must be <= 1, got 1.5`"),
    Case("negative_lambda", good_recipe(parameters={"lambda": -1}), r"parameters\.lambda: must be >= 0, got -1$",
         "`parameters.lambda: must be >= 0, got -1`"),
    Case("empty_models", text_recipe("base_model: a\nmodels: []\nmethod: ties\n"), r"models: expected a non-empty list .+",
         "`models: expected a non-empty list of {model: PATH_OR_ID, weight: NUMBER}`"),
    Case("base_as_model", same_as_base, rf"models\[1\]\.model: '{P}base' is the base model; list only fine-tuned models$",
         "`models[1].model: '<path>' is the base model; list only fine-tuned models`"),
    Case("base_as_model_other_spelling", base_other_spelling,
         rf"models\[0\]\.model: '{P}base/' is the base model \(the same folder as base_model\); .+",
         "`models[0].model: '<path>' is the base model (the same folder as base_model); list only fine-tuned models`"),
    Case("unknown_dtype", good_recipe(dtype="float8"), r"dtype: unknown dtype 'float8' \(allowed: .+\)$",
         "`dtype: unknown dtype 'float8' (allowed: float32, float16, bfloat16)`"),
    Case("no_output", no_output, r"output: no output folder \(give --output or set 'output' in the recipe\)$",
         "`output: no output folder (give --output or set 'output' in the recipe)`"),
    Case("bad_shard_size", with_args(good_recipe(), "--shard-size", "huge"),
         r"--shard-size: expected a size such as 5GB or 500MiB, got 'huge'$",
         "`--shard-size: expected a size such as 5GB or 500MiB, got 'huge'`"),
    Case("bad_device", with_args(good_recipe(), "--device", "tpu"), r"--device: expected auto, cpu or cuda, got 'tpu'$",
         "`--device: expected auto, cpu or cuda, got 'tpu'`"),
    # -- finding the models -------------------------------------------------------------------------------
    Case("missing_path", missing_folder, rf"{P}no-such-model: no such folder$", "`<path>: no such folder`"),
    Case("hub_offline", hub_offline,
         r"someorg/not-cached-model: no such local folder, and not in the Hub cache and HF_HUB_OFFLINE is set$",
         "`<hub id>: no such local folder, and not in the Hub cache and HF_HUB_OFFLINE is set`", sub=True,
         env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": "{d}/hub-cache", "HF_HOME": "{d}/hub-cache"}),
    Case("model_not_a_folder", not_a_folder, rf"{P}model\.safetensors: not a folder \(.+\)$",
         "`<path>: not a folder (a model is a folder with config.json and weights)`"),
    Case("no_weights", no_weights, rf"{P}task0: no weights found in {P}task0 \(expected .+\)$",
         "`<model>: no weights found in <folder> (expected *.safetensors or pytorch_model*.bin)`"),
    Case("bad_config_json", bad_config, rf"{P}task0/config\.json: not valid JSON$", "`<model>/config.json: not valid JSON`"),
    # -- damaged files ------------------------------------------------------------------------------------
    Case("truncated_shard", edit_file("model.safetensors", truncate),
         rf"{P}task0/model\.safetensors: truncated safetensors file \(\d+ bytes, header needs \d+\)$",
         "`<shard>: truncated safetensors file (N bytes, header needs M)`", sub=True),
    Case("corrupted_header", edit_file("model.safetensors", garble_header),
         rf"{P}task0/model\.safetensors: corrupted safetensors header \(not valid JSON\)$",
         "`<shard>: corrupted safetensors header (not valid JSON)`"),
    Case("header_length", edit_file("model.safetensors", huge_header_length, task=-1),
         rf"{P}base/model\.safetensors: corrupted safetensors header \(header length \d+ does not fit the file\)$",
         "`<shard>: corrupted safetensors header (header length N does not fit the file)`"),
    Case("index_missing_shard", missing_shard,
         rf"{P}task0/model\.safetensors\.index\.json: points at missing shard 'model-00002-of-00002\.safetensors'$",
         "`<index>: points at missing shard '<file>'`"),
    Case("corrupted_index", edit_file("model.safetensors.index.json", lambda p: p.write_text("{"), shards=2),
         rf"{P}task0/model\.safetensors\.index\.json: corrupted index \(.+\)$",
         "`<index>: corrupted index (expected a JSON object with 'weight_map')`"),
    Case("bin_needs_code", bin_file(pickled_object),
         rf"{P}task0/pytorch_model\.bin: refused: the file needs code to unpickle \({P}NeedsCode\); .+",
         "`<file>.bin: refused: the file needs code to unpickle (<module.Class>); only plain tensors are loaded (...)`",
         sub=True),
    Case("corrupted_bin", bin_file(random_bytes),
         rf"{P}task0/pytorch_model\.bin: cannot read PyTorch checkpoint: corrupted or not a checkpoint \(\w+\)$",
         "`<file>.bin: cannot read PyTorch checkpoint: corrupted or not a checkpoint (<error>)`"),
    Case("unsupported_dtype", edit_file("model.safetensors", complex_tensor),
         rf"{P}task0/model\.safetensors: tensor 'phase' has dtype 'C64', which neuromerge does not support \(.+\)$",
         "`<shard>: tensor '<name>' has dtype 'C64', which neuromerge does not support (supported: ...)`"),
    # -- models that do not fit together ------------------------------------------------------------------
    Case("architecture_mismatch", edit_model(lambda t: None, config={"model_type": "llama"}),
         rf"models\[0\] \({P}task0\): architecture 'llama' differs from the base's 'toy'$",
         "`models[i] (<model>): architecture '<type>' differs from the base's '<type>'`"),
    Case("missing_tensor", edit_model(drop("layer.1.weight")),
         rf"models\[0\] \({P}task0\): missing tensor 'layer\.1\.weight'$", "`models[i] (<model>): missing tensor '<name>'`"),
    Case("extra_tensor", edit_model(add("extra.bias", torch.zeros(3))),
         rf"models\[0\] \({P}task0\): extra tensor 'extra\.bias' not in the base$",
         "`models[i] (<model>): extra tensor '<name>' not in the base`"),
    Case("shape_mismatch", edit_model(add("layer.0.weight", torch.zeros(16, 9))),
         rf"models\[0\] \({P}task0\): tensor 'layer\.0\.weight' has shape \[16, 9\], the base has \[16, 8\]$",
         "`models[i] (<model>): tensor '<name>' has shape [a, b], the base has [c, d]`"),
    Case("vocab_size_mismatch", vocab_family,
         rf"models\[0\] \({P}task0\): tensor 'model\.embed_tokens\.weight' has shape \[24, 8\], the base has \[20, 8\]; "
         r"the vocabulary sizes differ \(24 vs 20\): resize the token embeddings to the base's first$",
         "`models[i] (<model>): tensor '<embedding>' has shape [24, 8], the base has [20, 8]; the vocabulary sizes "
         "differ (24 vs 20): resize the token embeddings to the base's first`", sub=True),
    Case("int_where_float", edit_model(add("layer.0.bias", torch.zeros(16, dtype=torch.int64))),
         rf"models\[0\] \({P}task0\): tensor 'layer\.0\.bias' is torch\.int64 but the base's is torch\.float32; "
         r"only float tensors can be merged$",
         "`models[i] (<model>): tensor '<name>' is torch.int64 but the base's is torch.float32; only float tensors can be merged`"),
    # -- bad values, found while merging ------------------------------------------------------------------
    Case("nan_in_task", set_value("layer.0.weight", float("nan")),
         rf"{P}task0: tensor 'layer\.0\.weight' contains NaN or Inf \(use --allow-nonfinite to merge anyway\)$",
         "`<model>: tensor '<name>' contains NaN or Inf (use --allow-nonfinite to merge anyway)`", sub=True),
    Case("inf_in_base", set_value("norm.weight", float("inf"), task=None, output="new/folders/merged"),
         rf"{P}base: tensor 'norm\.weight' contains NaN or Inf \(use --allow-nonfinite to merge anyway\)$",
         "`<model>: tensor '<name>' contains NaN or Inf (use --allow-nonfinite to merge anyway)`"),
    # -- the output ---------------------------------------------------------------------------------------
    Case("output_exists", output_exists, rf"output: {P}merged already exists \(use --overwrite to replace it\)$",
         "`output: <folder> already exists (use --overwrite to replace it)`", sub=True),
    Case("output_is_a_file", output_is_file, rf"output: {P}merged exists and is not a folder$",
         "`output: <path> exists and is not a folder`"),
    Case("output_under_a_file", output_under_a_file, rf"output: cannot create a folder in {P}a-file \(.+\)$",
         "`output: cannot create a folder in <parent> (<system error>)`"),
    Case("output_inside_input", output_in_input, rf"output: {P}task1/merged overlaps the input folder {P}task1$",
         "`output: <folder> overlaps the input folder <model>`"),
]


# -- running and checking -------------------------------------------------------------------------------


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with a digest of its content ('dir' for folders)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclass
class Outcome:
    code: int
    stderr: str
    before: dict[str, str]
    after: dict[str, str]
    exception: BaseException | None = None


def _env(case: Case, d: Path) -> dict[str, str]:
    return {k: v.replace("{d}", str(d)) for k, v in case.env.items()}


def run_in_process(case: Case, d: Path) -> Outcome:
    args = case.build(d)
    before = snapshot(d)
    result = CliRunner().invoke(app, ["run", *args], env=_env(case, d))
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return Outcome(result.exit_code, result.stderr, before, snapshot(d), exc)


def run_subprocess(case: Case, d: Path) -> Outcome:
    args = case.build(d)
    before = snapshot(d)
    env = {**os.environ, **_env(case, d), "COLUMNS": "80"}
    proc = subprocess.run([sys.executable, "-m", "neuromerge_cli", "run", *args], capture_output=True, text=True,
                          env=env, cwd=d, timeout=300)
    return Outcome(proc.returncode, proc.stderr, before, snapshot(d))


def check(case: Case, outcome: Outcome) -> None:
    assert outcome.exception is None, f"escaped: {outcome.exception!r}"
    assert "Traceback" not in outcome.stderr, outcome.stderr
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {outcome.stderr!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert re.match(case.pattern, lines[0][len("error: "):]), f"{lines[0]!r} does not match {case.pattern!r}"
    assert outcome.code == 1
    assert outcome.after == outcome.before, "the failed run changed files next to its inputs"


@pytest.fixture(scope="module")
def subprocess_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """The ``sub`` cases, run as real subprocesses two at a time."""
    cases = [c for c in CASES if c.sub]
    folders = [tmp_path_factory.mktemp(f"sub-{c.id}") for c in cases]
    with ThreadPoolExecutor(max_workers=2) as pool:
        outcomes = list(pool.map(run_subprocess, cases, folders))
    return {c.id: o for c, o in zip(cases, outcomes)}


def test_catalogue_has_at_least_25_distinct_cases() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 25


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_in_process(case: Case, tmp_path: Path) -> None:
    check(case, run_in_process(case, tmp_path))


# Found only by `run`: while the tensors stream, or about the output and run options.
RUN_ONLY = {"no_output", "bad_shard_size", "bad_device", "nan_in_task", "inf_in_base", "output_exists",
            "output_is_a_file", "output_under_a_file", "output_inside_input"}


@pytest.mark.parametrize("case", [c for c in CASES if c.id not in RUN_ONLY], ids=lambda c: c.id)
def test_validate_reports_the_same_error(case: Case, tmp_path: Path) -> None:
    recipe = case.build(tmp_path)[0]
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["validate", recipe], env=_env(case, tmp_path))
    check(case, Outcome(result.exit_code, result.stderr, before, snapshot(tmp_path),
                        result.exception if not isinstance(result.exception, SystemExit) else None))


@pytest.mark.parametrize("case", [c for c in CASES if c.sub], ids=lambda c: c.id)
def test_bad_input_subprocess(case: Case, subprocess_outcomes: dict[str, Outcome]) -> None:
    check(case, subprocess_outcomes[case.id])


def test_docs_list_every_case() -> None:
    """docs/errors.md shows each message shape, so the documentation cannot drift from the code."""
    text = DOCS.read_text()
    missing = [c.id for c in CASES if c.shape not in text]
    assert not missing, f"docs/errors.md lacks the message of: {missing}"
    assert "docs/errors.md" in (ROOT / "README.md").read_text()


def test_allow_nonfinite_merges_anyway(tmp_path: Path) -> None:
    """With --allow-nonfinite the NaN goes through the average; every other entry is merged as usual."""
    from safetensors.torch import load_file

    set_value("layer.0.weight", float("nan"))(tmp_path)
    args = recipe_args(tmp_path, tmp_path / "base", [tmp_path / "task0", tmp_path / "task1"], "linear")
    result = CliRunner().invoke(app, ["run", *args, "--allow-nonfinite"])
    assert result.exit_code == 0, result.output
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))["layer.0.weight"].view(-1)
    assert merged[3].isnan() and merged[torch.arange(merged.numel()) != 3].isfinite().all()


def test_progress_output_then_one_error_line(tmp_path: Path) -> None:
    """Without --quiet, progress lines come first and the error is still one last line."""
    args = [a for a in set_value("layer.0.weight", float("inf"))(tmp_path) if a != "-q"]
    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.splitlines()[-1].startswith(f"error: {tmp_path / 'task0'}: tensor 'layer.0.weight'")
    assert not (tmp_path / "merged").exists() and not list(tmp_path.glob(".merged*"))


def _needed(base: Path) -> int:
    """What the merge of the toy family writes: the base's tensors in their dtype, plus its config.json."""
    return sum(t.numel() * t.element_size() for t in toy_tensors(0).values()) + (base / "config.json").stat().st_size


@pytest.mark.parametrize("short", [True, False], ids=["one-byte-short", "just-enough"])
def test_free_disk_space_is_checked_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    short: bool) -> None:
    import neuromerge_cli.engine as engine

    base, tasks = family(tmp_path)
    args = recipe_args(tmp_path, base, tasks, output=str(tmp_path / "new" / "merged"))
    needed = _needed(base)
    margin = max(needed // 100, 16 * 2**20)
    probed = []

    def disk_usage(path: str | Path) -> shutil._ntuple_diskusage:
        probed.append(Path(path))
        free = needed + margin - (1 if short else 0)
        return shutil._ntuple_diskusage(10**12, 10**12 - free, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    if short:
        monkeypatch.setattr(engine, "run_statistics", lambda *a, **k: pytest.fail("work started"))
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["run", *args])
    assert probed == [tmp_path]  # the nearest existing folder on the output's path
    if short:
        assert result.exit_code == 1 and "Traceback" not in result.stderr
        assert re.fullmatch(rf"error: output: not enough free disk space in {re.escape(str(tmp_path))}: the merge "
                            r"writes [\d.]+ KiB \(\+16\.0 MiB margin\) but [\d.]+ MiB are free\n", result.stderr)
        assert snapshot(tmp_path) == before
    else:
        assert result.exit_code == 0, result.output
        assert (tmp_path / "new" / "merged" / "model.safetensors").exists()


def test_disk_full_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails mid-merge (the disk filled up meanwhile) is one clear line and leaves nothing."""
    import errno

    base, tasks = family(tmp_path)
    args = recipe_args(tmp_path, base, tasks)
    before = snapshot(tmp_path)

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", pwrite)
    result = CliRunner().invoke(app, ["run", *args])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr == f"error: output: cannot write {tmp_path / 'merged'} (No space left on device)\n"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("text", ["nan", "inf", "-1GB", "0", "5XB", "", "GB"])
def test_bad_shard_sizes(text: str) -> None:
    from neuromerge_cli.cli import parse_size
    from neuromerge_cli.errors import MergeError

    with pytest.raises(MergeError, match=r"^--shard-size: expected a size such as 5GB or 500MiB"):
        parse_size(text)


def test_index_and_config_of_the_wrong_shape(tmp_path: Path) -> None:
    """Valid JSON of the wrong shape in an index or config.json is a clear error, not a crash."""
    from neuromerge_cli.checkpoints import Source, open_checkpoint
    from neuromerge_cli.errors import MergeError

    base, tasks = family(tmp_path, shards=2)
    index = tasks[0] / "model.safetensors.index.json"
    for weight_map, message in [([1, 2], "corrupted index"), ({"a": 5}, "corrupted index"),
                                ({"a": "../base/model-00001-of-00002.safetensors"}, "is not a file name")]:
        index.write_text(json.dumps({"weight_map": weight_map}))
        with pytest.raises(MergeError, match=rf"^{re.escape(str(index))}: .*{message}"):
            open_checkpoint(Source("t", tasks[0]))
    (base / "config.json").write_text("[1, 2]")
    with pytest.raises(MergeError, match=r"config\.json: expected a JSON object, got list$"):
        open_checkpoint(Source("b", base))


def test_json_log_gives_one_error_event(tmp_path: Path) -> None:
    """With --json-log the same failure is one JSON `error` event on stderr, with the same message and exit code."""
    case = next(c for c in CASES if c.id == "truncated_shard")
    args = case.build(tmp_path)
    result = CliRunner().invoke(app, ["run", *args, "--json-log"])
    events = [json.loads(line) for line in result.stderr.splitlines()]
    errors = [e for e in events if e["event"] == "error"]
    assert len(errors) == 1 and errors[0]["exit_code"] == 1 == result.exit_code
    assert re.match(case.pattern, errors[0]["message"])
    assert not (tmp_path / "merged").exists()
