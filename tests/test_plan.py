"""The plan: roles, compatibility, tied weights, and an output laid out like the base."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import fine_tune, toy_family, toy_tensors, write_model
from neuromerge_cli.checkpoints import Checkpoint, open_checkpoint, resolve
from neuromerge_cli.errors import MergeError
from neuromerge_cli.plan import make_plan

BIG = 10**12


def opened(folders: list[Path]) -> list[Checkpoint]:
    return [open_checkpoint(resolve(str(f))) for f in folders]


def test_roles_and_single_file_layout(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 2)
    b, *ts = opened([base, *tasks])
    plan = make_plan(b, ts, None, BIG)
    roles = {t.name: t.role for t in plan.tensors}
    assert roles == {"embed.weight": "neuron", "layer.0.weight": "neuron", "layer.0.bias": "point",
                     "layer.1.weight": "neuron", "conv.weight": "neuron", "norm.weight": "point",
                     "position_ids": "copy"}
    assert not plan.sharded and list(plan.shards) == ["model.safetensors"]
    assert {t.name for t in plan.merged} == set(roles) - {"position_ids"}
    assert all(t.shape == b.tensors[t.name].shape and t.dtype == b.tensors[t.name].dtype for t in plan.tensors)


def test_sharded_base_keeps_its_grouping(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 1, shards=3)
    b, *ts = opened([base, *tasks])
    plan = make_plan(b, ts, torch.bfloat16, BIG)
    assert plan.sharded and len(plan.shards) == 3
    by_base_file = {}
    for name, info in b.tensors.items():
        by_base_file.setdefault(info.file.name, set()).add(name)
    assert sorted(map(frozenset, by_base_file.values()), key=sorted) == sorted(map(frozenset, plan.shards.values()), key=sorted)
    assert {t.name: t.dtype for t in plan.tensors}["position_ids"] == torch.int64
    assert all(t.dtype == torch.bfloat16 for t in plan.tensors if t.role != "copy")


def test_a_single_file_base_larger_than_the_shard_size_is_split(tmp_path: Path) -> None:
    base, tasks = toy_family(tmp_path, 1)
    b, *ts = opened([base, *tasks])
    plan = make_plan(b, ts, None, 700)  # bytes
    assert plan.sharded and len(plan.shards) > 1
    assert list(plan.shards) == [f"model-{i + 1:05d}-of-{len(plan.shards):05d}.safetensors" for i in range(len(plan.shards))]
    by_name = plan.by_name()
    for names in plan.shards.values():
        size = sum(by_name[n].nbytes for n in names)
        assert size <= 700 or len(names) == 1  # a tensor larger than the limit gets a shard of its own
    assert sorted(n for names in plan.shards.values() for n in names) == sorted(b.tensors)


def test_tied_weights_stored_twice_are_merged_once(tmp_path: Path) -> None:
    base = toy_tensors()
    base["lm_head.weight"] = base["embed.weight"].clone()
    base["decoder.weight"] = torch.randn(20, 8)  # same shape, not tied
    write_model(tmp_path / "base", {"model.embed_tokens.weight": base.pop("embed.weight"), **base})
    tasks = []
    for t in range(2):
        ft = fine_tune({"model.embed_tokens.weight": torch.zeros(0), **base}, t)
        ft["model.embed_tokens.weight"] = ft["lm_head.weight"].clone()
        tasks.append(write_model(tmp_path / f"t{t}", ft))
    b, *ts = opened([tmp_path / "base", *tasks])
    plan = make_plan(b, ts, None, BIG)
    assert plan.tied == {"model.embed_tokens.weight": "lm_head.weight"} or plan.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    alias, primary = next(iter(plan.tied.items()))
    assert plan.by_name()[alias].alias_of == primary
    assert alias not in {t.name for t in plan.merged} and primary in {t.name for t in plan.merged}
    order = [t.name for t in plan.tensors]
    assert order.index(primary) < order.index(alias)


def test_untied_in_one_fine_tune_is_not_tied(tmp_path: Path) -> None:
    base = {"embed_tokens.weight": torch.ones(4, 3), "lm_head.weight": torch.ones(4, 3)}
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "t0", {k: v + 1 for k, v in base.items()})
    write_model(tmp_path / "t1", {"embed_tokens.weight": torch.ones(4, 3) * 2, "lm_head.weight": torch.ones(4, 3) * 3})
    b, *ts = opened([tmp_path / "base", tmp_path / "t0", tmp_path / "t1"])
    assert make_plan(b, ts, None, BIG).tied == {}


def test_weights_equal_in_their_first_rows_only_are_not_tied(tmp_path: Path) -> None:
    embed = torch.randn(5, 3)
    head = embed.clone()
    head[-1, -1] += 1  # the first row (read first) agrees; the whole tensor does not
    for name in ("base", "t0"):
        write_model(tmp_path / name, {"embed_tokens.weight": embed, "lm_head.weight": head})
    b, t = opened([tmp_path / "base", tmp_path / "t0"])
    assert make_plan(b, [t], None, BIG).tied == {}
    write_model(tmp_path / "t1", {"embed_tokens.weight": embed, "lm_head.weight": embed.clone()})
    write_model(tmp_path / "base1", {"embed_tokens.weight": embed, "lm_head.weight": embed.clone()})
    b, t = opened([tmp_path / "base1", tmp_path / "t1"])
    assert len(make_plan(b, [t], None, BIG).tied) == 1


def test_incompatible_checkpoints_name_model_and_tensor(tmp_path: Path) -> None:
    base = toy_tensors()
    write_model(tmp_path / "base", base)
    write_model(tmp_path / "shape", {**base, "layer.0.bias": torch.zeros(17)})
    write_model(tmp_path / "missing", {k: v for k, v in base.items() if k != "norm.weight"})
    write_model(tmp_path / "arch", base, config={"model_type": "other"})
    for folder, pattern in (("shape", r"models\[0\].*'layer.0.bias' has shape \[17\], the base has \[16\]"),
                            ("missing", r"models\[0\].*missing tensor 'norm.weight'"),
                            ("arch", r"architecture 'other' differs from the base's 'toy'")):
        b, t = opened([tmp_path / "base", tmp_path / folder])
        with pytest.raises(MergeError, match=pattern):
            make_plan(b, [t], None, BIG)
