"""The registry of merge methods: one file per method."""

from __future__ import annotations

from ..errors import MergeError, did_you_mean
from .base import Fusion, Method, NeuronFusion, TensorJob, TensorParts, TensorResult
from .dare import DareLinear, DareTies
from .iso import IsoC, IsoCts
from .linear import Linear
from .neuromerging import NeuroMerging
from .neuronmerge import NeuronMerge
from .pcb import Pcb
from .subspace import Subspace
from .task_arithmetic import TaskArithmetic
from .ties import Ties
from .tsv import Tsv

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Linear, TaskArithmetic, Ties, DareLinear, DareTies, NeuroMerging, Subspace,
                              Pcb, Tsv, IsoC, IsoCts, NeuronMerge)
}


def get_method(name: str) -> Method:
    """The method called ``name``, or a MergeError listing the known ones."""
    try:
        return METHODS[name]()
    except KeyError:
        raise MergeError(f"method: unknown method {name!r} "
                         f"({did_you_mean(name, METHODS)}known: {', '.join(METHODS)})") from None


__all__ = ["METHODS", "Fusion", "Method", "TensorJob", "TensorParts", "TensorResult", "get_method"]
