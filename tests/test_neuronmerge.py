"""neuronmerge: drop / choose / merge neuron by neuron, delegated methods and their scopes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import fine_tune, toy_family, write_model
from neuromerge_cli.engine import MergeOptions, prepare, run_merge, schedule
from neuromerge_cli.methods import get_method
from neuromerge_cli.errors import MergeError
from neuromerge_cli.neuron_groups import NeuronGroups, load_groups, mlp_slot, save_groups
from neuromerge_cli.recipe import parse_recipe
from tiny_llama import build_llama

CATEGORIES = ["general", "math", "code"]
WEIGHTS = [1.0, 0.5]


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny Llama (with MLP biases), two fine-tuned copies and a hand-made groups file."""
    root = tmp_path_factory.mktemp("nm")
    base_dir = build_llama(root / "base", seed=1, layers=2, intermediate=24, mlp_bias=True)
    base = load_file(str(base_dir / "model.safetensors"))
    config = json.loads((base_dir / "config.json").read_text())
    tasks = [fine_tune(base, t) for t in range(2)]
    dirs = [write_model(root / f"ft{t}", tasks[t], config) for t in range(2)]
    gen = torch.Generator().manual_seed(7)
    codes = {layer: torch.randint(0, 3, (24,), generator=gen) for layer in range(2)}
    codes[1][:3] = torch.tensor([0, 1, 2])  # every category present in every layer
    codes[0][:3] = torch.tensor([0, 1, 2])
    save_groups(NeuronGroups(CATEGORIES, codes), root / "groups.safetensors")
    return {"root": root, "base_dir": base_dir, "dirs": dirs, "base": base, "tasks": tasks, "codes": codes,
            "groups": str(root / "groups.safetensors")}


def merge(family: dict, out: Path, method: str, params: dict, categories: list[str | None] | None = None,
          base: Path | None = None, models: list[Path] | None = None) -> dict[str, torch.Tensor]:
    cats = categories or [None, None]
    entries = []
    for i, d in enumerate(models or family["dirs"]):
        entry = {"model": str(d), "weight": WEIGHTS[i]}
        if cats[i] is not None:
            entry["category"] = cats[i]
        entries.append(entry)
    recipe = parse_recipe({"base_model": str(base or family["base_dir"]), "models": entries, "method": method,
                           "parameters": params})
    run_merge(prepare(recipe), MergeOptions(out, device="cpu"))
    return load_file(str(out / "model.safetensors"))


def neuron(t: torch.Tensor, name: str, j: int) -> torch.Tensor:
    slot = mlp_slot(name)
    assert slot is not None
    return t.select(slot.axis, j)


def mlp_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in tensors if mlp_slot(n) is not None]


def task_arithmetic(family: dict, name: str) -> torch.Tensor:
    base = family["base"][name]
    return base + sum(w * (t[name] - base) for w, t in zip(WEIGHTS, family["tasks"]))


@pytest.mark.parametrize("specific", ["drop", "choose", "merge"])
def test_specific_neurons_neuron_by_neuron(family: dict, tmp_path: Path, specific: str) -> None:
    params = {"groups": family["groups"], "specific": specific, "other_method": "task_arithmetic"}
    out = merge(family, tmp_path / "out", "neuronmerge", params, categories=["code", "math"])
    names = mlp_names(out)
    assert len(names) == 2 * 5  # gate/up weight+bias, down weight per layer (down bias is not per neuron)
    task_of = {1: 1, 2: 0}  # math -> models[1], code -> models[0]
    for name in names:
        layer = mlp_slot(name).layer
        ta = task_arithmetic(family, name)
        for j, code in enumerate(family["codes"][layer].tolist()):
            got = neuron(out[name], name, j)
            if code == 0 or specific == "merge":
                want = neuron(ta, name, j)
            elif specific == "drop":
                want = neuron(family["base"][name], name, j)
            else:
                want = neuron(family["tasks"][task_of[code]][name], name, j)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=f"{name} neuron {j} ({specific})")
    for name in out:
        if mlp_slot(name) is None:
            torch.testing.assert_close(out[name], task_arithmetic(family, name), rtol=0, atol=1e-6)


def test_other_tensors_equal_the_other_method_alone(family: dict, tmp_path: Path) -> None:
    dare = {"density": 0.5, "seed": 3}
    out = merge(family, tmp_path / "nm", "neuronmerge", {"groups": family["groups"], "other_params": dare})
    alone = merge(family, tmp_path / "dare", "dare_linear", dare)
    others = [n for n in out if mlp_slot(n) is None]
    assert any("self_attn" in n for n in others) and any("down_proj.bias" in n for n in others)
    for name in others:
        assert torch.equal(out[name], alone[name]), name
    assert not torch.equal(out["model.layers.0.mlp.up_proj.weight"], alone["model.layers.0.mlp.up_proj.weight"])


def _sliced_family(family: dict, root: Path, keep_mlp: bool) -> tuple[Path, list[Path]]:
    """Checkpoints holding only the general-neuron slices of the MLP tensors (keep_mlp) or only the
    non-MLP tensors: what the delegated method's scope is."""
    def cut(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in tensors.items():
            slot = mlp_slot(name)
            if keep_mlp and slot is not None:
                idx = (family["codes"][slot.layer] == 0).nonzero().flatten()
                out[name] = t.index_select(slot.axis, idx).contiguous()
            elif not keep_mlp and slot is None:
                out[name] = t
        return out

    base = write_model(root / "base", cut(family["base"]))
    return base, [write_model(root / f"t{i}", cut(t)) for i, t in enumerate(family["tasks"])]


def test_neuromerging_for_the_other_tensors_equals_it_alone_on_them(family: dict, tmp_path: Path) -> None:
    params = {"density": 0.3}
    out = merge(family, tmp_path / "nm", "neuronmerge", {"groups": family["groups"], "other_method": "neuromerging",
                                                         "other_params": params})
    b, ts = _sliced_family(family, tmp_path / "rest", keep_mlp=False)
    other = merge(family, tmp_path / "o", "neuromerging", params, base=b, models=ts)
    for name in other:
        torch.testing.assert_close(out[name], other[name], rtol=0, atol=1e-6)
    # the scoped trim is sampled as NeuroMerging's own is (the rows of its scope); without a sample, two reads
    stats = get_method("neuronmerge").global_stats(
        {"groups": family["groups"], "general_method": "task_arithmetic", "general_params": {},
         "other_method": "neuromerging", "other_params": get_method("neuromerging").parse_params(params),
         "specific": "drop", "random_groups": False, "seed": 0}, 2, torch.device("cpu"))
    assert [s.samples for s in stats] == [True]
    stats[0].end_sample()
    assert len(schedule(stats)) == 2


def test_a_scoped_statistic_samples_the_rows_and_columns_of_its_neurons(family: dict) -> None:
    """A sampled block of rows [start, stop) of gate_proj keeps its general neurons among those rows; one of
    down_proj keeps the general neurons' columns; other tensors give the general scope nothing."""
    params = {"groups": family["groups"], "general_method": "ties",
              "general_params": get_method("ties").parse_params({"density": 0.3}), "other_method": "task_arithmetic",
              "other_params": {}, "specific": "drop", "random_groups": False, "seed": 0}
    method = get_method("neuronmerge")
    recipe = parse_recipe({"base_model": str(family["base_dir"]), "method": "neuronmerge", "parameters": params,
                           "models": [{"model": str(d)} for d in family["dirs"]]})
    method.bind(recipe, prepare(recipe, read_weights=False).plan)
    trim = method.global_stats(params, 2, torch.device("cpu"))[0]
    assert trim.samples and trim.key == "general/trim"
    general = {layer: (codes == 0).nonzero().flatten() for layer, codes in family["codes"].items()}
    expected = []
    for name, rows in [("model.layers.0.mlp.gate_proj.weight", (5, 17)), ("model.layers.1.mlp.down_proj.weight", (2, 9)),
                       ("model.layers.0.self_attn.q_proj.weight", (0, 4))]:
        tensors = [family["base"][name][rows[0]:rows[1]], *(t[name][rows[0]:rows[1]] for t in family["tasks"])]
        trim.observe_sample(name, tensors, 1, rows)
        slot = mlp_slot(name)
        if slot is None:
            continue
        idx = general[slot.layer]
        idx = idx[(idx >= rows[0]) & (idx < rows[1])] - rows[0] if slot.axis == 0 else idx
        kept = [x.index_select(slot.axis, idx).float().reshape(-1) for x in tensors]
        expected.append(torch.stack([k - kept[0] for k in kept[1:]]))
    got = trim.inner._sample.take()
    assert len(got) == len(expected) == 2
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize("scope, method, params", [
    ("other", "neuromerging", {"density": 0.3}),  # the scoped trim: 1 read aimed, 2 without a sample
    ("general", "ties", {"density": 0.3}),  # and the majority sign's read after it: 2 aimed, 3 without
])
def test_a_sample_of_the_scopes_rows_aims_a_scoped_trim(family: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          scope: str, method: str, params: dict) -> None:
    from neuromerge_cli import engine

    recipe = {"groups": family["groups"], f"{scope}_method": method, f"{scope}_params": params}
    reads = {}
    for share in (1.0, 0.0):  # every row (gate/up rows and down columns of the general neurons), or no sample
        monkeypatch.setattr(engine, "SAMPLE_SHARE", share)
        entries = [{"model": str(d), "weight": WEIGHTS[i]} for i, d in enumerate(family["dirs"])]
        parsed = parse_recipe({"base_model": str(family["base_dir"]), "models": entries, "method": "neuronmerge",
                               "parameters": recipe})
        report = run_merge(prepare(parsed), MergeOptions(tmp_path / str(share), device="cpu"))
        reads[share] = report["timings"]["statistics_reads"]
    assert reads == ({1.0: 1, 0.0: 2} if method == "neuromerging" else {1.0: 2, 0.0: 3})
    aimed, plain = (load_file(str(tmp_path / str(share) / "model.safetensors")) for share in (1.0, 0.0))
    assert all(torch.equal(aimed[name], plain[name]) for name in plain)


@pytest.mark.parametrize("scope", ["global", "tensor"])  # a per-tensor trim is found in the merge read
def test_ties_scopes_are_general_neurons_and_other_tensors(family: dict, tmp_path: Path, scope: str) -> None:
    """general_method=ties trims over the general neurons only; other_method=ties over the rest only."""
    ties = {"density": 0.3, "mask_scope": scope}
    out = merge(family, tmp_path / "nm", "neuronmerge", {"groups": family["groups"], "general_method": "ties",
                                                         "general_params": ties, "other_method": "ties",
                                                         "other_params": ties})
    b, ts = _sliced_family(family, tmp_path / "mlp", keep_mlp=True)
    general = merge(family, tmp_path / "g", "ties", ties, base=b, models=ts)
    b, ts = _sliced_family(family, tmp_path / "rest", keep_mlp=False)
    other = merge(family, tmp_path / "o", "ties", ties, base=b, models=ts)
    for name, t in out.items():
        slot = mlp_slot(name)
        if slot is None:
            torch.testing.assert_close(t, other[name], rtol=0, atol=1e-6)
            continue
        codes = family["codes"][slot.layer]
        idx = (codes == 0).nonzero().flatten()
        torch.testing.assert_close(t.index_select(slot.axis, idx), general[name], rtol=0, atol=1e-6)
        rest = (codes != 0).nonzero().flatten()
        assert torch.equal(t.index_select(slot.axis, rest), family["base"][name].index_select(slot.axis, rest))
    report = json.loads((tmp_path / "nm" / "merge_report.json").read_text())["global"]
    n_general = sum(int((c == 0).sum()) for c in family["codes"].values())
    assert report["general_method"]["trim"]["entries_per_task"] == n_general * (3 * 16 + 2)  # gate, up, down (16 each) + gate, up biases
    assert report["groups"]["totals"]["general"] == n_general


def test_random_groups_keep_sizes_and_drive_the_merge(family: dict, tmp_path: Path) -> None:
    groups = load_groups(family["groups"])
    shuffled = groups.shuffled(5)
    assert shuffled.codes[0].tolist() == groups.shuffled(5).codes[0].tolist()
    for layer in groups.codes:
        assert groups.counts(layer) == shuffled.counts(layer)
    assert any(not torch.equal(groups.codes[layer], shuffled.codes[layer]) for layer in groups.codes)
    params = {"groups": family["groups"], "random_groups": True, "seed": 5, "other_method": "task_arithmetic"}
    out = merge(family, tmp_path / "out", "neuronmerge", params)
    name = "model.layers.1.mlp.down_proj.weight"
    for j, code in enumerate(shuffled.codes[1].tolist()):
        want = task_arithmetic(family, name) if code == 0 else family["base"][name]
        torch.testing.assert_close(neuron(out[name], name, j), neuron(want, name, j), rtol=0, atol=1e-6)


def _recipe(family: dict, params: dict, categories: list | None = None, method: str = "neuronmerge",
            base: Path | None = None) -> dict:
    models = []
    for i, d in enumerate(family["dirs"]):
        entry = {"model": str(d)}
        if categories and categories[i]:
            entry["category"] = categories[i]
        models.append(entry)
    return {"base_model": str(base or family["base_dir"]), "models": models, "method": method, "parameters": params}


@pytest.mark.parametrize("params, categories, method, message", [
    ({}, None, "neuronmerge", r"parameters.groups: missing"),
    ({"groups": "g", "general_params": {"densty": 0.1}}, None, "neuronmerge",
     r"parameters.general_params.densty: method 'task_arithmetic' takes no parameter"),
    ({"groups": "g", "other_params": {"density": 2}}, None, "neuronmerge", r"parameters.other_params.density: must be <= 1"),
    ({"groups": "g", "general_method": "neuronmerge"}, None, "neuronmerge", r"parameters.general_method: expected one of"),
    ({"groups": "g", "specific": "keep"}, None, "neuronmerge", r"parameters.specific: expected one of drop, choose, merge"),
    ({}, ["math", None], "linear", r"models\[0\].category: method 'linear' does not use categories"),
    ({"groups": "g"}, ["math", "math"], "neuronmerge", r"models\[1\].category: 'math' is already"),
    ({"groups": "g"}, ["general", None], "neuronmerge", r"models\[0\].category: 'general' is not a task category"),
])
def test_recipe_errors_name_the_key(family: dict, params: dict, categories: list | None, method: str,
                                    message: str) -> None:
    with pytest.raises(MergeError, match=message):
        parse_recipe(_recipe(family, params, categories, method))


@pytest.mark.parametrize("params, categories, message", [
    ({"specific": "choose"}, ["math", None], r"no model has category 'code'"),
    ({}, ["math", "translation"], r"models\[1\].category: 'translation' is not a task category of parameters.groups"),
    ({"groups": "missing.safetensors"}, None, r"missing.safetensors: no such groups file"),
])
def test_bind_errors(family: dict, params: dict, categories: list | None, message: str) -> None:
    recipe = parse_recipe(_recipe(family, {"groups": family["groups"], **params}, categories))
    with pytest.raises(MergeError, match=message):
        prepare(recipe)


def test_groups_must_fit_the_model(family: dict, tmp_path: Path) -> None:
    wrong = NeuronGroups(CATEGORIES, {0: torch.zeros(24, dtype=torch.long), 1: torch.zeros(20, dtype=torch.long)})
    save_groups(wrong, tmp_path / "g.safetensors")
    with pytest.raises(MergeError, match="layer 1 has 20 neurons, the model has 24"):
        prepare(parse_recipe(_recipe(family, {"groups": str(tmp_path / "g.safetensors")})))


def test_unsupported_architecture(family: dict, tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, num_tasks=2)
    recipe = parse_recipe({"base_model": str(base), "models": [str(t) for t in tasks], "method": "neuronmerge",
                           "parameters": {"groups": family["groups"]}})
    with pytest.raises(MergeError, match="no Llama-style gated MLP weights .*supported: Llama, Mistral, Qwen2"):
        prepare(recipe)


def test_context_follows_the_parameters(family: dict) -> None:
    """A sweep reuses the bound method with other parameters: groups follow random_groups and seed."""
    recipe = parse_recipe(_recipe(family, {"groups": family["groups"]}))
    method = prepare(recipe).method
    plain = method.context(recipe.params).groups
    shuffled = method.context({**recipe.params, "random_groups": True, "seed": 5}).groups
    assert torch.equal(plain.codes[0], family["codes"][0])
    assert torch.equal(shuffled.codes[0], load_groups(family["groups"]).shuffled(5).codes[0])


@pytest.mark.parametrize("method, params", [
    ("task_arithmetic", {"lambda": 0.7}), ("linear", {}), ("dare_linear", {"density": 0.6, "seed": 2}),
    ("dare_ties", {"density": 0.6, "seed": 2}), ("ties", {"density": 0.4, "mask_scope": "tensor"}),
])
def test_merging_every_neuron_with_one_per_tensor_method_is_that_method(family: dict, tmp_path: Path, method: str,
                                                                       params: dict) -> None:
    """specific: merge with the same per-tensor method everywhere reproduces the method alone, bit for bit."""
    nm = {"groups": family["groups"], "specific": "merge", "general_method": method, "general_params": params,
          "other_method": method, "other_params": params}
    out = merge(family, tmp_path / "nm", "neuronmerge", nm)
    alone = merge(family, tmp_path / "alone", method, params)
    for name in out:
        assert torch.equal(out[name], alone[name]), name
