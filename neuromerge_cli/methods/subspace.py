"""subspace: NeuroMerging's ablation (paper Table 6/12) — keep one neuronal subspace of one model.

``keep: orthogonal`` writes θ0 + p (each neuron's task row minus its projection on the base row),
``keep: parallel`` writes θ0 + a·w0. No trimming. Point parameters (biases, norms) have no
subspaces: ``points: task`` (default) keeps their full task vector, ``points: base`` resets them.
The model's recipe weight w scales what is kept (θ0 + w·part; 1 by default).
"""

from __future__ import annotations

from typing import Any

from .base import Method, TensorJob, TensorResult
from .params import choice
from .subspaces import as_rows, split_parts


class Subspace(Method):
    name = "subspace"
    summary = "ablation: θ0 + the orthogonal or the parallel neuronal parts of one fine-tuned model"
    params = (
        choice("keep", "orthogonal", "which neuronal subspace of the task vector to keep", ("orthogonal", "parallel")),
        choice("points", "task", "point parameters (ndim <= 1): keep their task vector, or reset to the base",
               ("task", "base")),
    )
    min_models = 1
    max_models = 1

    def merge(self, job: TensorJob, params: dict[str, Any]) -> TensorResult:
        weight = float(job.weights[0])
        tau = job.deltas[0]
        if job.role != "neuron":
            return TensorResult(tau * weight if params["points"] == "task" else tau * 0.0)
        parallel, orthogonal = split_parts(as_rows(job.base), as_rows(job.deltas, 1))
        kept = orthogonal if params["keep"] == "orthogonal" else parallel
        energy = float(tau.double().square().sum())
        stats = {"parallel_share": [float(parallel.double().square().sum()) / energy if energy else 0.0],
                 "orthogonal_share": [float(orthogonal.double().square().sum()) / energy if energy else 0.0]}
        return TensorResult(kept[0].reshape(tau.shape) * weight, stats)
