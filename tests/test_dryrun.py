"""`neuromerge run --dry-run`: the plan from headers only, and its figures against a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import GLOBAL_TIES_READS, fine_tune, toy_family, toy_tensors, write_model, write_recipe
from neuromerge_cli.checkpoints import Checkpoint
from neuromerge_cli.cli import app
from neuromerge_cli import dryrun, engine, kernels
from neuromerge_cli.dryrun import STORED_FACTOR, WORKSPACE_FACTOR, describe
from neuromerge_cli.engine import PREFETCH, MergeOptions, prepare, run_merge
from neuromerge_cli.errors import MergeError
from neuromerge_cli.recipe import load_recipe

T = 3


@pytest.fixture
def no_weight_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Checkpoint, name: str) -> torch.Tensor:
        raise AssertionError(f"a dry run read tensor {name}")

    monkeypatch.setattr(Checkpoint, "read", refuse)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return toy_family(tmp_path_factory.mktemp("family"), T)


def _sizes(dtype_out: torch.dtype | None = None) -> dict[str, tuple[int, int, int]]:
    """name → (bytes of one read across base + T tasks, numel, bytes written), from the toy tensors."""
    out = {}
    for name, t in toy_tensors().items():
        written = t.numel() * ((dtype_out.itemsize if dtype_out and t.is_floating_point() else t.element_size()))
        out[name] = (t.numel() * t.element_size() * (T + 1), t.numel(), written)
    return out


def test_plan_figures_from_headers(family, tmp_path: Path, no_weight_reads: None) -> None:
    base, tasks = family
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base, tasks, "ties", {"density": 0.4}, dtype="bfloat16"))
    plan = describe(prepare(recipe, read_weights=False), "cpu", tmp_path / "out")
    sizes = _sizes(torch.bfloat16)
    floats = {n: s for n, s in sizes.items() if n != "position_ids"}
    assert plan["tensors"] == 7 and plan["roles"] == {"neuron": 4, "point": 2, "copy": 1}
    reads = GLOBAL_TIES_READS  # the exact global threshold, the majority sign in the second
    assert plan["statistics_reads"] == reads and plan["reads"] == reads + 1
    assert plan["bytes_read_statistics"] == reads * sum(s[0] for s in floats.values())
    assert plan["bytes_read_merge"] == sum(s[0] for s in sizes.values())
    assert plan["bytes_read"] == plan["bytes_read_statistics"] + plan["bytes_read_merge"]
    assert plan["bytes_written"] == sum(s[2] for s in sizes.values())
    assert plan["device"] == "cpu" and plan["tie_candidates"] == []
    mem = plan["memory"]
    largest = max(floats, key=lambda n: floats[n][1])
    assert mem["largest_tensor"] == largest == "embed.weight"
    reads = sorted((s[0] for s in sizes.values()), reverse=True)  # toys are never cut into blocks
    assert mem["in_flight_bytes"] == reads[0] + sum(reads[:PREFETCH + 1])  # merging one, PREFETCH + 1 ahead
    assert mem["working_bytes"] == (T + 1) * floats[largest][1] * 4 * WORKSPACE_FACTOR
    assert not (tmp_path / "out").exists()


def test_memory_estimate_of_row_blocks_and_of_a_pass_over_stored_inputs(family, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Hand-worked with blocks of 32 entries: embed.weight (20×8) in blocks of 4 rows is the largest
    piece (32 values); per-tensor trim thresholds are found in the merge read, which then reads whole
    stored tensors (and merges them in blocks)."""
    monkeypatch.setattr(engine, "BLOCK_ELEMENTS", 32)
    base, tasks = family
    ta = describe(prepare(load_recipe(write_recipe(tmp_path / "a.yaml", base, tasks, "task_arithmetic")),
                          read_weights=False), "cpu", tmp_path / "out")["memory"]
    block = 4 * 8 * 4 * (T + 1)  # bytes of a 4-row block of embed.weight, float32, base + T tasks
    assert (ta["phase"], ta["largest_tensor"], ta["largest_rows"], ta["largest_numel"]) == ("merge read", "embed.weight", (0, 4), 32)
    assert ta["working_bytes"] == (T + 1) * 32 * 4 * WORKSPACE_FACTOR
    assert ta["in_flight_bytes"] == block + (PREFETCH + 1) * block
    ties = describe(prepare(load_recipe(write_recipe(tmp_path / "t.yaml", base, tasks, "ties", {"mask_scope": "tensor"})),
                            read_weights=False), "cpu", tmp_path / "out")["memory"]
    reads = sorted((s[0] for s in _sizes().values()), reverse=True)  # whole tensors, copied ones too
    assert 20 * 8 * 4 * STORED_FACTOR < (T + 1) * 32 * 4 * WORKSPACE_FACTOR  # the blocks' merge needs more
    assert (ties["phase"], ties["largest_tensor"], ties["largest_rows"], ties["stored_inputs"]) == ("merge read", "embed.weight", (0, 4), False)
    assert ties["working_bytes"] == (T + 1) * 32 * 4 * WORKSPACE_FACTOR
    assert ties["in_flight_bytes"] == reads[0] + sum(reads[:PREFETCH + 1])
    monkeypatch.setattr(dryrun, "WORKSPACE_FACTOR", 1)  # observing a whole tensor needs more than merging a block
    ties = describe(prepare(load_recipe(write_recipe(tmp_path / "t.yaml", base, tasks, "ties", {"mask_scope": "tensor"})),
                            read_weights=False), "cpu", tmp_path / "out")["memory"]
    assert (ties["phase"], ties["largest_tensor"], ties["largest_rows"], ties["stored_inputs"]) == ("merge read", "embed.weight", None, True)
    assert ties["working_bytes"] == 20 * 8 * 4 * STORED_FACTOR


def test_plan_matches_what_a_run_reads(family, tmp_path: Path) -> None:
    base, tasks = family
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base, tasks, "dare_ties", {"density": 0.5}))
    plan = describe(prepare(recipe, read_weights=False), "cpu", tmp_path / "out")
    passes: dict[str, int] = {}
    run_merge(prepare(recipe), MergeOptions(tmp_path / "out", "cpu",
                                            progress=lambda phase, d, n, b, bt: passes.__setitem__(phase, bt)))
    assert plan["reads"] == len(passes)
    assert plan["bytes_read"] == sum(passes.values())
    written = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert 0 < written - plan["bytes_written"] < 4096  # the shard header on top of the tensor bytes


@pytest.mark.parametrize("method", ["neuromerging", "ties", "pcb"])
@pytest.mark.parametrize("share", ["1", "0"])
def test_a_sampled_statistic_is_planned_in_one_read_as_it_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               share: str, method: str) -> None:
    g = torch.Generator().manual_seed(8)
    weights = {"big.weight": torch.randn(1024, 32, generator=g), "norm.weight": torch.ones(32)}
    base = write_model(tmp_path / "base", weights)
    tasks = [write_model(tmp_path / f"task{t}", fine_tune(weights, t)) for t in range(2)]
    params = {"ratio": 0.2} if method == "pcb" else {"density": 0.2}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base, tasks, method, params))
    monkeypatch.setattr(engine, "SAMPLE_SHARE", float(share))  # every row, or no sample
    plan = describe(prepare(recipe, read_weights=False), "cpu", tmp_path / "out")
    report = run_merge(prepare(recipe), MergeOptions(tmp_path / "out", "cpu"))
    reads = (1 if share == "1" else 2) * (2 if method == "pcb" else 1)  # pcb: two statistics, one after the other
    assert plan["statistics_reads"] == report["timings"]["statistics_reads"] == reads
    assert (1000 < plan["sample_rows"] <= 1024) if share == "1" else plan["sample_rows"] == 0
    lines = dryrun.plan_lines(plan)
    assert (f"after a sample of {plan['sample_rows']} rows" in lines[2]) == (share == "1")


def test_no_statistics_for_task_arithmetic(family, tmp_path: Path, no_weight_reads: None) -> None:
    base, tasks = family
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base, tasks, "task_arithmetic"))
    plan = describe(prepare(recipe, read_weights=False), "auto", tmp_path / "out")
    assert plan["statistics_reads"] == 0 and plan["reads"] == 1
    assert plan["bytes_read"] == plan["bytes_read_merge"]
    assert plan["device"] == ("cuda" if torch.cuda.is_available() else "cpu")


def test_tied_weights_are_candidates_without_reading(tmp_path: Path, no_weight_reads: None) -> None:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(12, 4, generator=g)
    tensors = {"model.embed_tokens.weight": emb, "lm_head.weight": emb.clone(), "model.norm.weight": torch.ones(4)}
    base = write_model(tmp_path / "base", tensors)
    task = write_model(tmp_path / "task", fine_tune(tensors, 1))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base, [task], "task_arithmetic"))
    plan = describe(prepare(recipe, read_weights=False), "cpu", tmp_path / "out")
    assert [sorted(g) for g in plan["tie_candidates"]] == [["lm_head.weight", "model.embed_tokens.weight"]]
    assert plan["bytes_read_merge"] == (12 * 4 * 2 + 4) * 4 * 2  # planned untied: an upper bound


def test_hub_reference_not_cached_downloads_nothing(tmp_path: Path, family) -> None:
    base, _ = family
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", base, [Path("org-never/cached-model")], "task_arithmetic"))
    with pytest.raises(MergeError, match="org-never/cached-model: not in the Hub cache, and a dry run downloads nothing"):
        prepare(recipe, read_weights=False)


def test_cli_dry_run(family, tmp_path: Path, no_weight_reads: None) -> None:
    base, tasks = family
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, "ties", {"density": 0.4}, tmp_path / "out")
    result = CliRunner().invoke(app, ["run", str(recipe), "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dry run: ties over 3 model(s)")
    assert lines[0].endswith(f" on cpu with {kernels.cpu_sweeps()} (no weight read)")
    assert lines[1] == "tensors: 7 (4 neuron, 2 point, 1 copied)"
    assert lines[2] == f"passes: {GLOBAL_TIES_READS} statistics read(s) + 1 merge read of the base and every model"
    assert lines[3].startswith("read: ") and lines[4].startswith("write: ")
    # where the kernels count |τ| straight from the stored inputs, the statistics reads hold no task vectors
    peak_phase = "merge read" if kernels.ENABLED else "statistics read 1"
    assert lines[5].startswith(f"peak memory (estimate, {peak_phase}): ")
    assert not (tmp_path / "out").exists()

    result = CliRunner().invoke(app, ["run", str(recipe), "--dry-run", "--json-log"])
    assert result.exit_code == 0, result.output
    events = [json.loads(x) for x in result.stderr.splitlines()]
    assert [e["event"] for e in events] == ["plan"]
    assert events[0]["reads"] == GLOBAL_TIES_READS + 1 and events[0]["memory"]["prefetch"] == PREFETCH


def test_cli_dry_run_refuses_an_existing_output(family, tmp_path: Path) -> None:
    base, tasks = family
    (tmp_path / "out").mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", base, tasks, "ties", None, tmp_path / "out")
    result = CliRunner().invoke(app, ["run", str(recipe), "--dry-run"])
    assert result.exit_code == 1 and "already exists (use --overwrite" in result.stderr
    assert CliRunner().invoke(app, ["run", str(recipe), "--dry-run", "--overwrite"]).exit_code == 0
