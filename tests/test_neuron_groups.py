"""The groups file and the MLP neuron layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neuromerge_cli.errors import MergeError
from neuromerge_cli.neuron_groups import MlpSlot, NeuronGroups, load_groups, mlp_slot, save_groups


@pytest.mark.parametrize("name, slot", [
    ("model.layers.3.mlp.gate_proj.weight", MlpSlot(3, "gate", 0)),
    ("model.layers.3.mlp.up_proj.bias", MlpSlot(3, "up", 0)),
    ("layers.12.mlp.down_proj.weight", MlpSlot(12, "down", 1)),
    ("model.layers.3.mlp.down_proj.bias", None),
    ("model.layers.3.self_attn.q_proj.weight", None),
    ("model.layers.3.block_sparse_moe.experts.0.w1.weight", None),
])
def test_mlp_slot(name: str, slot: MlpSlot | None) -> None:
    assert mlp_slot(name) == slot


def test_round_trip_and_counts(tmp_path: Path) -> None:
    g = NeuronGroups(["general", "math", "code"], {0: torch.tensor([0, 1, 1, 2]), 1: torch.tensor([2, 2, 0, 0])},
                     {"top_k": "10"})
    save_groups(g, tmp_path / "g.safetensors")
    back = load_groups(tmp_path / "g.safetensors")
    assert back.categories == g.categories and back.metadata["top_k"] == "10"
    assert all(torch.equal(back.codes[k], g.codes[k]) for k in g.codes)
    assert back.counts(0) == {"general": 1, "math": 2, "code": 1}
    assert back.totals() == {"general": 3, "math": 2, "code": 3}
    assert list(tmp_path.iterdir()) == [tmp_path / "g.safetensors"]  # no temporary file left


@pytest.mark.parametrize("tensors, meta, message", [
    ({"layers.0": torch.zeros(3, dtype=torch.int16)}, {"format": "other"}, "not a neuromerge groups file"),
    ({"layers.0": torch.zeros(3, dtype=torch.int16)}, {"format": "neuromerge-groups", "categories": '["math"]'},
     "must be a list of distinct names starting with 'general'"),
    ({"layers.0": torch.full((3,), 5, dtype=torch.int16)},
     {"format": "neuromerge-groups", "categories": '["general", "math"]'}, "codes outside 0..1"),
    ({"w": torch.zeros(3)}, {"format": "neuromerge-groups", "categories": '["general", "math"]'}, "unexpected tensor 'w'"),
])
def test_bad_files(tmp_path: Path, tensors: dict, meta: dict, message: str) -> None:
    save_file(tensors, str(tmp_path / "g.safetensors"), metadata=meta)
    with pytest.raises(MergeError, match=message):
        load_groups(tmp_path / "g.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(MergeError, match="not a readable safetensors groups file"):
        load_groups(tmp_path / "junk.safetensors")
