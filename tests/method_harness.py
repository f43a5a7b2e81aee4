"""Running a merge method in memory the way the engine does (statistics passes, then one job per tensor)."""

from __future__ import annotations

from typing import Any

import torch

from neuromerge_cli.engine import schedule
from neuromerge_cli.figures import figure_values
from neuromerge_cli.methods import TensorJob, get_method


def merge_in_memory(method: str, raw: dict[str, Any], base: dict[str, torch.Tensor],
                    tasks: list[dict[str, torch.Tensor]], weights: list[float] | None = None,
                    device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Run a method like the engine does (statistics passes, then one job per tensor), without files."""
    m = get_method(method)
    params = m.parse_params(raw)
    dev = torch.device(device)
    w = torch.tensor(weights or [1.0] * len(tasks), dtype=torch.float32, device=dev)
    names = [n for n, t in base.items() if t.is_floating_point()]

    def deltas(n: str) -> torch.Tensor:
        b = base[n].to(dev).float()
        return torch.stack([tk[n].to(dev).float() for tk in tasks]).sub_(b)

    stats = m.global_stats(params, len(tasks), dev)
    for stat in stats:
        if stat.samples:  # every matrix sampled whole
            for n in names:
                if base[n].ndim >= 2:
                    stat.observe_sample(n, [base[n], *(tk[n] for tk in tasks)], 1, (0, base[n].shape[0]))
            stat.end_sample()
    g = 0
    while g < len(passes := schedule(stats)):  # planned again after each read, as the engine does
        active = passes[g]
        g += 1
        for n in names:
            for stat, p in active:
                if stat.stored_inputs:
                    stat.observe_stored(p, n, [base[n], *(tk[n] for tk in tasks)], w)
                else:
                    stat.observe(p, n, deltas(n), w)
        for stat, p in active:
            stat.end_pass(p)
    by_key = {s.key: s for s in stats}
    out, tensor_stats = {}, {}
    for n in names:
        job = TensorJob(n, "neuron" if base[n].ndim >= 2 else "point", base[n].to(dev).float(), deltas(n), w, by_key)
        result = m.merge(job, params)
        out[n] = result.delta.cpu()
        tensor_stats[n] = figure_values(result.stats)
    return out, m.report(params, by_key), tensor_stats


def family(num_tasks: int, seed: int = 0, dtype: torch.dtype = torch.float32, out: int = 12, width: int = 10
           ) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A base with a Linear-like weight, a conv weight and a bias, and ``num_tasks`` random fine-tunes."""
    g = torch.Generator().manual_seed(seed)
    base = {"lin.weight": torch.randn(out, width, generator=g), "conv.weight": torch.randn(4, 2, 3, 3, generator=g),
            "lin.bias": torch.randn(out, generator=g)}
    tasks = [{n: t + 0.1 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(num_tasks)]
    cast = lambda d: {n: t.to(dtype) for n, t in d.items()}  # noqa: E731
    return cast(base), [cast(t) for t in tasks]
