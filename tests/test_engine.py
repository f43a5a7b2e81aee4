"""The engine: pass scheduling, bounded read-ahead, devices, float32 math over any storage dtype."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import GLOBAL_TIES_READS, fine_tune, load_output, merge, recipe_dict, toy_family, toy_tensors, write_model
from neuromerge_cli import engine
from neuromerge_cli.engine import PREFETCH, TensorLoader, pick_device, prepare, sample_pieces, schedule
from neuromerge_cli.errors import MergeError
from neuromerge_cli.methods import get_method
from neuromerge_cli.plan import Plan, TensorPlan
from neuromerge_cli.stats import MajoritySignStat, TrimStat
from neuromerge_cli.recipe import parse_recipe
from reference import load_folder, reference_merge


def test_schedule_runs_dependent_statistics_after_their_prerequisite() -> None:
    ties = get_method("ties")
    trim, model = ties.global_stats(ties.parse_params({}), 2, torch.device("cpu"))
    # global TIES: the trim in one read where a sample aims it (two where not); the majority sign in the merge read
    assert model.passes == 0 and schedule([trim, model]) == [[(trim, 0)]]
    trim.end_sample()  # no sample
    assert schedule([trim, model]) == [[(trim, 0)], [(trim, 1)]]
    trim = TrimStat(0.2, "global", 2, torch.device("cpu"))
    majority = MajoritySignStat(trim)  # (NeuronMerge's delegated TIES: its scope's sign in statistics reads)
    # the majority sign reads after the trim (it needs the exact thresholds) ...
    assert schedule([trim, majority]) == [[(trim, 0)], [(trim, 1)], [(majority, 0)]]
    trim.passes = 1  # ... one read earlier where the trim's first read finds them
    assert schedule([trim, majority]) == [[(trim, 0)], [(majority, 0)]]
    with pytest.raises(ValueError, match="listed before"):
        schedule([majority, trim])
    majority = MajoritySignStat(TrimStat(1.0, "global", 2, torch.device("cpu")))
    assert schedule([majority._trim, majority]) == [[(majority, 0)]]  # no trim pass: the majority's alone
    trim, model = ties.global_stats(ties.parse_params({"density": 1.0}), 2, torch.device("cpu"))
    assert schedule([trim, model]) == []  # no trim: no statistics read at all
    per_tensor, on_demand = ties.global_stats(ties.parse_params({"mask_scope": "tensor"}), 2, torch.device("cpu"))
    # a per-tensor trim observes each tensor in the merge read; the tensor majority reads on demand only
    assert per_tensor.in_merge_read and schedule([per_tensor, on_demand]) == []
    assert schedule([]) == []


@pytest.mark.parametrize("params, reads", [({}, None), ({"mask_scope": "tensor"}, 0), ({"merge_fn": "sum"}, 2),
                                           ({"density": 1.0}, 0)])
def test_statistics_reads(tmp_path: Path, params: dict, reads: int | None) -> None:
    base, tasks = toy_family(tmp_path, 2)
    report = merge(recipe_dict(base, tasks, "ties", params), tmp_path / "out")
    assert report["timings"]["statistics_reads"] == (GLOBAL_TIES_READS if reads is None else reads)


def test_a_sample_spreads_blocks_of_rows_over_the_matrices(monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = {"a": (300, 4), "bias": (300,), "b": (1000, 2), "c": (5, 3, 3), "empty": (0, 4)}
    plan = plan_of(shapes)
    monkeypatch.setattr(engine, "SAMPLE_BLOCKS", 16)
    monkeypatch.setattr(engine, "SAMPLE_SHARE", 0.05)
    sample = sample_pieces(plan, list(shapes))
    # 5 % of the 1305 matrix rows (vectors have none) in 16 blocks of 5 rows, one every ~82 rows in order
    assert len(sample) == 16 and {p.name for p in sample} == {"a", "b"}
    starts = [{"a": 0, "b": 300, "c": 1300}[p.name] + p.rows[0] for p in sample if p.rows]
    assert starts == [(2 * b + 1) * 1305 // 32 for b in range(16)]
    assert all(p.rows and p.rows[1] - p.rows[0] <= 5 and p.rows[1] <= shapes[p.name][0] for p in sample)
    monkeypatch.setattr(engine, "SAMPLE_ROWS", 32)  # the cap on rows: 2 per block
    assert all(p.rows and p.rows[1] - p.rows[0] <= 2 for p in sample_pieces(plan, list(shapes)))
    assert sample_pieces(plan_of({"v": (50,)}), ["v"]) == []


def plan_of(shapes: dict[str, tuple[int, ...]]) -> Plan:
    tensors = [TensorPlan(name, "neuron" if len(s) > 1 else "point", s, torch.float32, "model.safetensors")
               for name, s in shapes.items()]
    return Plan(tensors, {"model.safetensors": list(shapes)}, False, 0)


def test_neuromerging_trims_globally_in_one_read_where_a_sample_aims_it(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(8)
    base = {"big.weight": torch.randn(2048, 32, generator=g), "small.weight": torch.randn(16, 8, generator=g),
            "norm.weight": torch.ones(32)}
    write_model(tmp_path / "base", base)
    tasks = [write_model(tmp_path / f"task{t}", fine_tune(base, t)) for t in range(3)]
    recipe = recipe_dict(tmp_path / "base", tasks, "neuromerging", {"density": 0.2})
    monkeypatch.setattr(engine, "SAMPLE_SHARE", 1.0)  # every row sampled: the window holds the thresholds
    aimed = merge(recipe, tmp_path / "aimed")
    monkeypatch.setattr(engine, "SAMPLE_SHARE", 0.0)  # no sample: the first read finds the bins, the second the rest
    plain = merge(recipe, tmp_path / "plain")
    assert aimed["timings"]["statistics_reads"] == 1 and plain["timings"]["statistics_reads"] == 2
    trim, trim_plain = aimed["global"]["trim"], plain["global"]["trim"]
    assert trim["threshold"] == trim_plain["threshold"] and trim["kept_fraction"] == trim_plain["kept_fraction"]
    assert trim["sigma"] == pytest.approx(trim_plain["sigma"], rel=1e-12)
    out, want = load_output(tmp_path / "aimed"), load_output(tmp_path / "plain")
    assert all(torch.equal(out[name], want[name]) for name in want)


def test_read_ahead_is_bounded(tmp_path: Path) -> None:
    """Memory holds the tensors in flight, never the model: at most PREFETCH + 1 tensors read ahead."""
    base, tasks = toy_family(tmp_path, 2)
    prepared = prepare(parse_recipe(recipe_dict(base, tasks, "linear")))
    loader = TensorLoader(prepared, torch.device("cpu"), allow_nonfinite=False)
    read: list[str] = []
    inner = loader._read
    loader._read = lambda name: (read.append(name), inner(name))[1]  # type: ignore[method-assign]
    names = sorted(toy_tensors())
    consumed = 0
    for name, tensors in loader.stream(names):
        assert name == names[consumed]
        assert len(tensors) == 3 and torch.equal(tensors[0], load_folder(base)[name])
        consumed += 1
        assert len(read) - consumed <= PREFETCH
    assert read == names
    theta0, deltas = loader.as_float([load_folder(d)["layer.0.weight"] for d in (base, *tasks)])
    assert theta0.dtype == deltas.dtype == torch.float32 and deltas.shape == (2, 16, 8)


def test_pick_device() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MergeError, match="--device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MergeError, match="no CUDA device"):
            pick_device("cuda")


def test_half_precision_storage_is_merged_in_float32(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 3, dtype=torch.float16)
    params = {"lambda": 0.3}
    merge(recipe_dict(base, tasks, "task_arithmetic", params), tmp_path / "out")
    out, ref = load_output(tmp_path / "out"), reference_merge(base, tasks, "task_arithmetic", params)
    for name, t in out.items():
        if t.is_floating_point():
            assert t.dtype == torch.float16
            # one rounding to float16 of the (float32-exact) result: within half a float16 step of the reference
            torch.testing.assert_close(t.double(), ref[name].double(), rtol=2**-11, atol=2**-24, msg=name)


def test_pytorch_bin_inputs_merge_like_safetensors(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path / "st", 2)
    bins = []
    for i, folder in enumerate(tasks):
        target = tmp_path / "bin" / f"t{i}"
        target.mkdir(parents=True)
        torch.save(load_folder(folder), target / "pytorch_model.bin")
        (target / "config.json").write_text((folder / "config.json").read_text())
        bins.append(target)
    merge(recipe_dict(base, tasks, "ties"), tmp_path / "a")
    merge(recipe_dict(base, bins, "ties"), tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_deterministic_and_nonfinite_inputs(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 2)
    merge(recipe_dict(base, tasks, "ties"), tmp_path / "a")
    merge(recipe_dict(base, tasks, "ties"), tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    bad = load_folder(tasks[0])
    bad["norm.weight"][3] = float("inf")
    write_model(tasks[0], bad)
    with pytest.raises(MergeError, match=r"task0: tensor 'norm.weight' contains NaN or Inf"):
        merge(recipe_dict(base, tasks, "linear"), tmp_path / "c")
    merge(recipe_dict(base, tasks, "linear"), tmp_path / "c", allow_nonfinite=True)
    assert torch.isinf(load_output(tmp_path / "c")["norm.weight"][3])


def test_output_inside_an_input_is_refused(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 1)
    with pytest.raises(MergeError, match="overlaps the input folder"):
        merge(recipe_dict(base, tasks, "linear"), base / "merged")
    assert not (base / "merged").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method, params", [("ties", {"density": 0.2}), ("ties", {"mask_scope": "tensor"}),
                                            ("dare_ties", {"density": 0.5, "seed": 1}), ("pcb", {"ratio": 0.2})])
def test_cuda_gives_the_cpu_result(tmp_path: Path, method: str, params: dict) -> None:
    base, tasks = toy_family(tmp_path, 3)
    cpu = merge(recipe_dict(base, tasks, method, params), tmp_path / "cpu")
    gpu = merge(recipe_dict(base, tasks, method, params), tmp_path / "gpu", device="cuda")
    assert gpu["device"].startswith("cuda") and "cuda_bytes" in gpu["peak_memory"]
    assert [r.get("threshold") for r in gpu["tasks"]] == [r.get("threshold") for r in cpu["tasks"]]
    a, b = load_output(tmp_path / "cpu"), load_output(tmp_path / "gpu")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)



@pytest.mark.parametrize("name, text, message", [("NEUROMERGE_SAMPLE_SHARE", "abc", "is not a number"),
                                                  ("NEUROMERGE_BLOCK_ELEMENTS", "1e3", "is not an integer")])
def test_settings_from_the_environment_are_checked(monkeypatch: pytest.MonkeyPatch, name: str, text: str,
                                                   message: str) -> None:
    plan = plan_of({"a": (300, 4)})
    monkeypatch.setenv(name, text)
    def use() -> list[engine.Piece]:
        return sample_pieces(plan, ["a"]) if "SAMPLE" in name else engine.pieces(plan, ["a"], True)

    with pytest.raises(MergeError, match=f"{name}='{text}' {message}"):
        use()
    monkeypatch.setenv(name, "0.5" if "SAMPLE" in name else "400")  # and used: half the rows, or 100 rows a block
    assert len(use()) == (150 if "SAMPLE" in name else 3)
