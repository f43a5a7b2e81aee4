"""The merge plan: names aligned across checkpoints, tensor roles, tied weights, output shards."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .checkpoints import Checkpoint, TensorInfo
from .errors import MergeError

ROLES = ("neuron", "point", "copy")
TIE_SUFFIXES = ("embed_tokens.weight", "shared.weight", "word_embeddings.weight", "wte.weight",
                "tok_embeddings.weight", "embed_in.weight",
                "lm_head.weight", "embed_out.weight", "decoder.weight", "output.weight")


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: how it is produced and where it goes."""

    name: str
    role: str  # neuron: float, ndim >= 2; point: float, ndim <= 1; copy: integer/bool, from the base
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype
    shard: str
    alias_of: str | None = None  # a tied weight: written from the merged result of that tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass
class Plan:
    """Everything decided before any weight is read for merging."""

    tensors: list[TensorPlan]
    shards: dict[str, list[str]]  # file name -> tensor names, in write order
    sharded: bool
    bytes_in: int
    tied: dict[str, str] = field(default_factory=dict)  # alias -> primary

    @property
    def merged(self) -> list[TensorPlan]:
        """Tensors that a method merges (float, not an alias), in write order."""
        return [t for t in self.tensors if t.role != "copy" and t.alias_of is None]

    @property
    def bytes_out(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def by_name(self) -> dict[str, TensorPlan]:
        return {t.name: t for t in self.tensors}


def role_of(info: TensorInfo) -> str:
    if not info.dtype.is_floating_point:
        return "copy"
    return "neuron" if len(info.shape) >= 2 else "point"


def check_compatible(base: Checkpoint, tasks: list[Checkpoint]) -> None:
    """Same architecture, the same tensor names, shapes and kinds of dtype in every checkpoint."""
    base_type = (base.config or {}).get("model_type")
    for i, task in enumerate(tasks):
        where = f"models[{i}] ({task.source.reference})"
        if task.path == base.path:
            raise MergeError(f"models[{i}].model: '{task.source.reference}' is the base model (the same folder as "
                             "base_model); list only fine-tuned models")
        task_type = (task.config or {}).get("model_type")
        if base_type and task_type and base_type != task_type:
            raise MergeError(f"{where}: architecture '{task_type}' differs from the base's '{base_type}'")
        missing = [n for n in base.tensors if n not in task.tensors]
        if missing:
            raise MergeError(f"{where}: missing tensor '{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [n for n in task.tensors if n not in base.tensors]
        if extra:
            raise MergeError(f"{where}: extra tensor '{extra[0]}' not in the base" + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        for name, b in base.tensors.items():
            t = task.tensors[name]
            if t.shape != b.shape:
                hint = ""
                if len(b.shape) == 2 and b.shape[1:] == t.shape[1:] and name.endswith(TIE_SUFFIXES):
                    hint = f"; the vocabulary sizes differ ({t.shape[0]} vs {b.shape[0]}): resize the token embeddings to the base's first"
                raise MergeError(f"{where}: tensor '{name}' has shape {list(t.shape)}, the base has {list(b.shape)}{hint}")
            if t.dtype.is_floating_point != b.dtype.is_floating_point:
                raise MergeError(f"{where}: tensor '{name}' is {t.dtype} but the base's is {b.dtype}; only float tensors can be merged")


def tie_candidates(base: Checkpoint) -> list[list[str]]:
    """Groups of embedding/head names of equal shape and dtype (from headers; no weight is read)."""
    groups: dict[tuple, list[str]] = {}
    for n, info in base.tensors.items():
        if n.endswith(TIE_SUFFIXES) and info.dtype.is_floating_point:
            groups.setdefault((info.shape, info.dtype), []).append(n)
    return [names for names in groups.values() if len(names) > 1]


def find_tied(base: Checkpoint, tasks: list[Checkpoint]) -> dict[str, str]:
    """Tied weights stored under several names (e.g. lm_head = embed_tokens): alias -> primary.

    A group of tie candidates counts as tied only when its bytes are equal in the base and in
    every fine-tuned model.
    """
    tied: dict[str, str] = {}
    for names in tie_candidates(base):
        rows = base.tensors[names[0]].shape[0] if base.tensors[names[0]].shape else 0
        # split each group into classes of equal tensors: e.g. (decoder, embed = lm_head)
        while len(names) > 1:
            primary, *others = names
            same = others
            # first rows first: untied weights (the usual case) are told apart without reading them
            for part in ([(0, 1)] if rows > 1 else []) + [None]:
                for ck in (base, *tasks):
                    if not same:
                        break
                    ref = ck.read(primary, part)
                    same = [o for o in same if torch.equal(ref, ck.read(o, part))]
            tied.update({o: primary for o in same})
            names = [o for o in others if o not in same]
    return tied


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def make_plan(base: Checkpoint, tasks: list[Checkpoint], dtype: torch.dtype | None, shard_size: int,
              compare_ties: bool = True) -> Plan:
    """Check compatibility, classify tensors and lay out the output like the base.

    ``compare_ties=False`` reads no weight: tie candidates are then planned as separate tensors
    (a dry run's upper bound), so such a plan is for describing a merge, not for running one.
    """
    check_compatible(base, tasks)
    tied = find_tied(base, tasks) if compare_ties else {}
    # The base's own order: by file, then by offset.
    order = sorted(base.tensors.values(), key=lambda i: (str(i.file), i.offset))

    def out_dtype(info: TensorInfo) -> torch.dtype:
        return dtype if dtype is not None and info.dtype.is_floating_point else info.dtype

    groups: list[list[TensorInfo]] = []
    if base.sharded:
        by_file: dict[str, list[TensorInfo]] = {}
        for info in order:
            by_file.setdefault(str(info.file), []).append(info)
        groups = list(by_file.values())
    else:
        size = 0
        for info in order:
            nbytes = info.numel * out_dtype(info).itemsize
            if not groups or (size + nbytes > shard_size and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(info)
            size += nbytes
    sharded = len(groups) > 1 or base.sharded
    # A primary is merged before its aliases: aliases go last in write order.
    tensors: list[TensorPlan] = []
    shards: dict[str, list[str]] = {}
    for i, group in enumerate(groups):
        file = _shard_name(i, len(groups)) if sharded else "model.safetensors"
        group = sorted(group, key=lambda info: info.name in tied)
        shards[file] = [info.name for info in group]
        for info in group:
            tensors.append(TensorPlan(info.name, role_of(info), info.shape, out_dtype(info), file, tied.get(info.name)))
    tensors.sort(key=lambda t: t.alias_of is not None)
    bytes_in = sum(info.nbytes for ck in (base, *tasks) for info in ck.tensors.values())
    return Plan(tensors, shards, sharded, bytes_in, tied)
