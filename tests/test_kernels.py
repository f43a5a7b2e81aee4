"""Fused CPU kernels: the same float32 tensors as the torch operations they replace, bit for bit."""

from __future__ import annotations

import pytest
import torch

from helpers import needs_kernels
from neuromerge_cli import kernels, stats, topk
from neuromerge_cli.kernels import MERGE_FUNCTIONS
from neuromerge_cli.methods.common import apply_drop
from neuromerge_cli.methods.elect import merge_values, sign_conflict_rate, tie_mass, weighted_values
from neuromerge_cli.sums import sign_total

# built but without kernels: a CPU without x86-64-v3 (the module then has none; torch does the work)
pytestmark = pytest.mark.skipif(kernels._kernels is not None and not kernels._kernels.FULL_SPEED,
                                reason="this CPU has no x86-64-v3, for which the kernels are compiled")
CPU = torch.device("cpu")
# sizes around the kernels' vector width (8) and float64 chunk (4096), and an empty tensor
SIZES = [0, 1, 7, 8, 13, 4096, 4096 * 2 + 5]


def test_the_extension_is_built() -> None:
    assert kernels._kernels is not None, "neuromerge_cli/_kernels.c was not compiled: pip install -e ."


def inputs(n: int, dtype: torch.dtype, num_tasks: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    return [base.to(dtype)] + [(base + 0.01 * torch.randn(n, generator=g)).to(dtype) for _ in range(num_tasks)]


@pytest.fixture(params=["f16c", "integer"])
def float16_conversion(request: pytest.FixtureRequest):
    """Runs a test with float16 converted by F16C (where the CPU has it) and by integer operations."""
    wanted = request.param == "f16c"
    if kernels.float16_instructions(wanted) != wanted:
        pytest.skip("the CPU has no F16C (or the extension is not built)")
    yield
    kernels.float16_instructions(True)


def torch_path(monkeypatch: pytest.MonkeyPatch, fn, *args):
    with monkeypatch.context() as m:
        m.setattr(kernels, "ENABLED", False)
        return fn(*args)


def f64_norms(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.stack([t.double() for t in tensors[1:]]) - tensors[0].double()
    return d.abs().sum(1), d.square().sum(1).sqrt()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("n", SIZES)
@needs_kernels
@pytest.mark.usefixtures("float16_conversion")
def test_task_vectors_and_norms_match_the_torch_path(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                     n: int) -> None:
    tensors = inputs(n, dtype)
    assert kernels.applies(tensors, CPU)
    base, deltas, l1, l2 = stats.task_vectors_and_norms(tensors, CPU)
    want_base, want_deltas, _, _ = torch_path(monkeypatch, stats.task_vectors_and_norms, tensors, CPU)
    assert torch.equal(base, want_base) and torch.equal(deltas, want_deltas)
    want_l1, want_l2 = f64_norms(tensors)
    torch.testing.assert_close(l1, want_l1, rtol=1e-6, atol=0)
    torch.testing.assert_close(l2, want_l2, rtol=1e-6, atol=0)
    base, deltas = stats.float_task_vectors(tensors, CPU)
    assert torch.equal(base, want_base) and torch.equal(deltas, want_deltas)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.usefixtures("float16_conversion")
def test_abs_difference_matches_the_torch_path(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    base, x = inputs(4096 + 3, dtype, num_tasks=1)
    got = stats.abs_difference(x.reshape(-1, 1), base.reshape(-1, 1))
    assert got.shape == (4096 + 3, 1)
    assert torch.equal(got, torch_path(monkeypatch, stats.abs_difference, x.reshape(-1, 1), base.reshape(-1, 1)))


def test_a_nonfinite_input_makes_its_task_norm_nonfinite() -> None:
    tensors = inputs(100, torch.bfloat16)
    tensors[2][57] = float("nan")
    tensors[3][3] = float("inf")
    _, deltas, l1, l2 = kernels.task_vectors_and_norms(tensors)
    assert torch.isfinite(l1).tolist() == [True, False, False]
    assert torch.isfinite(l2).tolist() == [True, False, False]
    assert deltas[1, 57].isnan() and deltas[2, 3] == float("inf")


def cancelling_inputs(n: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """[θ0, θ_1..θ_4] whose task vectors cancel exactly at every third entry (θ0 = 0, θ_2 = −θ_1,
    θ_3 = θ_4 = 0): unweighted elections tie there."""
    tensors = inputs(n, dtype, num_tasks=4, seed=seed)
    tensors[0][::3] = 0
    tensors[2][::3] = -tensors[1][::3]
    tensors[3][::3] = tensors[4][::3] = 0
    return tensors


def torch_merge(tensors: list[torch.Tensor], weights: torch.Tensor, merge_fn: str, dtype: torch.dtype, scale: float,
                thresholds: torch.Tensor | None, majority: float, drops: list[torch.Tensor] | None = None,
                keep: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, float, int, torch.Tensor]:
    """What the torch path computes: common.dare_drop, stats.TrimStat.mask, elect.merge_values,
    engine.merge_piece's scale, add and cast; the delta, the sign-conflict rate, the Σ of elected signs
    and the tie positions."""
    base, deltas = torch_path(pytest.MonkeyPatch(), stats.float_task_vectors, tensors, CPU)
    if drops is not None:
        deltas = apply_drop(deltas, drops, keep)
    trimmed = deltas if thresholds is None else deltas.abs().ge_(thresholds[:, None]).mul_(deltas).add_(0.0)
    merged = merge_values(trimmed, weights, merge_fn, majority=majority)
    delta = merged * scale
    out = (base + delta).to(dtype)  # not in place: float32 inputs come back as they are
    weighted = weighted_values(trimmed, weights)
    s = torch.sign(weighted.sum(0))
    ties = (tie_mass(weighted, s) > 0).nonzero().squeeze(1)
    return out, delta, sign_conflict_rate(trimmed), int(sign_total(s)), ties


@pytest.mark.parametrize("dtype, out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                              (torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                                              (torch.float16, torch.float16), (torch.float16, torch.float32),
                                              (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("merge_fn", MERGE_FUNCTIONS)
@pytest.mark.usefixtures("float16_conversion")
def test_merge_gives_the_bytes_of_the_torch_path(dtype: torch.dtype, out_dtype: torch.dtype, n: int,
                                                 merge_fn: str) -> None:
    tensors = cancelling_inputs(n, dtype, seed=n)
    g = torch.Generator().manual_seed(7)
    masks = [torch.rand(n, generator=g) < 0.3 for _ in range(4)]
    for weights, trim, scale, majority, drop in [([1.0] * 4, False, 1.0, 1.0, False),
                                                 ([0.3, 1.7, 0.55, 1.0], True, 0.37, -1.0, False),
                                                 ([1.0, 2.0, 1.0, 0.5], True, 1.0, 0.0, False),
                                                 ([1.0, 2.0, 1.0, 0.5], False, 0.8, 1.0, True)]:
        w = torch.tensor(weights)
        thr = torch.tensor([0.005, 0.0, 0.012, 0.3]) if trim else None
        drops = masks if drop else None
        got = kernels.merge(tensors, w, merge_fn, out_dtype, scale, thr, majority, conflicts=True, ties=True,
                            drops=drops, keep=0.3)
        out, delta, conflict, total, ties = torch_merge(tensors, w, merge_fn, out_dtype, scale, thr, majority,
                                                        drops, 0.3)
        case = (weights, trim, scale, majority, drop)
        assert got.out.dtype == out_dtype and torch.equal(got.out, out), case
        assert (got.conflicts / n if n else 0.0) == conflict
        if merge_fn.startswith("elect"):
            assert got.sign_total == total and torch.equal(got.ties, ties), case
            assert n < 3 or trim or drop or ties.numel() > 0  # the cancellations tie
        want_l1, want_l2 = f64_norms(tensors)
        torch.testing.assert_close(got.l1, want_l1, rtol=1e-6, atol=0)
        torch.testing.assert_close(got.l2, want_l2, rtol=1e-6, atol=0)
        assert got.delta_norm == pytest.approx(float(delta.double().norm()), rel=1e-5, abs=1e-12)


def test_merge_rounds_to_nearest_even_and_keeps_nan() -> None:
    # θ0 = 1, τ = 2^-8 + 2^-9 etc.: results halfway between two bfloat16 values round to the even one
    base = torch.ones(16)
    task = base + torch.tensor([2.0 ** -8, 3 * 2.0 ** -9, 2.0 ** -9, 5 * 2.0 ** -9] * 4)
    task[5] = float("nan")
    out = kernels.merge([base, task], torch.ones(1), "sum", torch.bfloat16).out
    want = (base + (task - base)).to(torch.bfloat16)
    assert out[5].isnan()
    keep = torch.arange(16) != 5
    assert torch.equal(out[keep], want[keep])


@pytest.mark.parametrize("case", ["float64", "mixed", "strided", "shapes", "too many tasks"])
@needs_kernels
def test_applies_only_to_what_the_kernels_take(case: str) -> None:
    tensors = inputs(64, torch.bfloat16)
    if case == "float64":
        tensors = [t.double() for t in tensors]
    elif case == "mixed":
        tensors[1] = tensors[1].float()
    elif case == "strided":
        tensors = [t.reshape(8, 8).t() for t in tensors]
    elif case == "too many tasks":
        tensors = tensors[:1] * (kernels.MAX_TASKS + 2)
    else:
        tensors[2] = tensors[2][:32]
    assert kernels.applies(inputs(64, torch.bfloat16), CPU)
    assert not kernels.applies(tensors, CPU)
    assert not kernels.applies(inputs(64, torch.bfloat16), torch.device("meta"))


@pytest.mark.parametrize("n", SIZES + [3 * 4096 + 11, 3 * (1 << 18) + 4101])  # the last: parts over 4 threads
def test_count_around_counts_as_torch_does(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(kernels, "threads", lambda: 4)
    g = torch.Generator().manual_seed(n)
    x = torch.randint(0, 9, (n,), generator=g).float() / 4  # many repeats of each value
    if n > 5:
        x[3] = float("nan")
    for value in (0.0, 0.75, 1.0, 2.5, float("nan")):
        want = (int(torch.count_nonzero(x < value)), int(torch.count_nonzero(x == value)))
        assert kernels.count_around(x, value) == want


@pytest.mark.parametrize("n", SIZES + [3 * (1 << 18) + 4101])
def test_capped_sums_match_float64(monkeypatch: pytest.MonkeyPatch, n: int) -> None:
    monkeypatch.setattr(kernels, "threads", lambda: 4)
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)).abs()
    for cap in (0.0, 0.5, 10.0):
        total, capped = kernels.capped_sums(x, cap)
        assert total == pytest.approx(float(x.double().sum()), rel=1e-13, abs=1e-300)
        assert capped == pytest.approx(float(x.double().clamp_max(cap).sum()), rel=1e-13, abs=1e-300)
    x = torch.tensor([1.0, float("nan"), 2.0])
    assert all(v != v for v in kernels.capped_sums(x, 1.5))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("n", [0, 13, 4096 * 2 + 5, 3 * (1 << 18) + 4101])
@pytest.mark.usefixtures("float16_conversion")
def test_scans_of_stored_inputs_read_their_magnitudes(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype,
                                                      n: int) -> None:
    """count_around, capped_sums and count_and_sums of stored inputs [base, x] see |x − base| in float32."""
    monkeypatch.setattr(kernels, "threads", lambda: 4)
    base, x = inputs(n, dtype, num_tasks=1, seed=n)
    if n > 5:
        x[3] = base[3]  # a zero magnitude
    mags = (x.float() - base.float()).abs()
    for value in (0.0, float(torch.tensor(0.004)), float(mags[7]) if n > 7 else 0.5):  # float32 values
        below, equal = int(torch.count_nonzero(mags < value)), int(torch.count_nonzero(mags == value))
        total, capped = float(mags.double().sum()), float(mags.double().clamp_max(value).sum())
        assert kernels.count_around(x, value, base) == (below, equal)
        got_total, got_capped = kernels.capped_sums(x, value, base)
        both = kernels.count_and_sums(x, value, base)
        assert both[:2] == (below, equal)
        for a, b in ((got_total, total), (got_capped, capped), (both[2], total), (both[3], capped)):
            assert a == pytest.approx(b, rel=1e-12, abs=1e-300)


def histogram_inputs(stored: bool, dtype: torch.dtype, n: int = 4096 + 5, seed: int = 3
                     ) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor]:
    """(base or None, the rows the kernel reads, the float32 values whose magnitudes it counts (T, n)):
    rows of values, or stored inputs [base, *tasks] whose task vectors are the values."""
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(3, n, generator=g) * torch.tensor([[1e-3], [1.0], [1e3]])
    if not stored:
        return None, list(values), values
    base = torch.randn(n, generator=g).to(dtype)
    rows = [(base.float() + v).to(dtype) for v in values]
    return base, rows, torch.stack([r.float() - base.float() for r in rows])


@pytest.mark.parametrize("stored, dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16),
                                           (True, torch.float16)])
@pytest.mark.parametrize("threads", [1, 4])
@needs_kernels
@pytest.mark.usefixtures("float16_conversion")
def test_magnitude_histogram_counts_the_high_bits_of_every_magnitude(monkeypatch: pytest.MonkeyPatch, stored: bool,
                                                                     dtype: torch.dtype, threads: int) -> None:
    monkeypatch.setattr(kernels, "threads", lambda: threads)
    base, rows, values = histogram_inputs(stored, dtype, n=3 * (1 << 18) + 4101)  # parts with 4 threads
    rows[1][7] = float("nan")
    values[1, 7] = float("nan")
    counts = torch.full((3 << 16,), 5, dtype=torch.int64)  # added to, not overwritten
    l1 = torch.ones(3, dtype=torch.float64)
    spare = kernels.SpareCounts(counts)  # a row per thread past the first, added up by flush
    assert spare.counts.shape[0] == threads - 1
    kernels.magnitude_histogram(rows, counts, l1, base, spare=spare)
    spare.flush()
    bits = values.view(torch.int32) & 0x7FFFFFFF
    for t in range(3):
        want = torch.bincount((bits[t] >> 16).long(), minlength=1 << 16) + 5
        assert torch.equal(counts[t << 16:(t + 1) << 16], want)
    assert l1[0] == pytest.approx(1 + float(values[0].double().abs().sum()), rel=1e-13)
    assert l1[1] != l1[1] and l1[2] == pytest.approx(1 + float(values[2].double().abs().sum()), rel=1e-13)


@pytest.mark.parametrize("stored, dtype", [(False, torch.float32), (True, torch.float32), (True, torch.bfloat16),
                                           (True, torch.float16)])
@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("with_coarse", [False, True])
@needs_kernels
@pytest.mark.usefixtures("float16_conversion")
def test_magnitude_window_counts_each_bit_pattern_inside_it_and_sums_below(
        monkeypatch: pytest.MonkeyPatch, stored: bool, dtype: torch.dtype, threads: int, with_coarse: bool) -> None:
    monkeypatch.setattr(kernels, "threads", lambda: threads)
    base, rows, values = histogram_inputs(stored, dtype, n=3 * (1 << 18) + 4101, seed=4)
    if not stored:  # many entries share a bit pattern
        values = torch.randint(-40, 41, values.shape, generator=torch.Generator().manual_seed(4)).float() / 16
        rows = list(values)
    rows[2][9] = float("nan")
    values[2, 9] = float("nan")
    bits = (values.view(torch.int32) & 0x7FFFFFFF).long()
    # a window of one bin for task 0 (a global trim's second read), one across bins, off the bins' edges, for the others
    width = 1 << 16 if with_coarse else 3 * (1 << 16) + 17
    starts = torch.stack([bits[t][t * 100] - (t > 0) * 40000 for t in range(3)])
    if not with_coarse:
        starts[0] = (starts[0] >> 16) << 16
    window = kernels.Window(starts, width, torch.full((3 * width,), 2, dtype=torch.int64),
                            torch.ones(3, dtype=torch.float64))
    if with_coarse:
        counts, l1 = torch.full((3 << 16,), 5, dtype=torch.int64), torch.ones(3, dtype=torch.float64)
        spare = kernels.SpareCounts(counts, window)
        kernels.magnitude_histogram(rows, counts, l1, base, window, spare)
        spare.flush()
        for t in range(3):  # the coarse count as without the window
            want = torch.bincount((bits[t] >> 16), minlength=1 << 16) + 5
            assert torch.equal(counts[t << 16:(t + 1) << 16], want)
        assert l1[0] == pytest.approx(1 + float(values[0].double().abs().sum()), rel=1e-13)
    else:
        spare = kernels.SpareCounts(None, window)
        half = rows[0].numel() // 2  # two calls into the same spare counts, flushed once
        for part in (slice(0, half), slice(half, None)):
            kernels.magnitude_window([r[part] for r in rows], window, None if base is None else base[part], spare)
        spare.flush()
    for t in range(3):
        offset = bits[t] - starts[t]
        inside = (offset >= 0) & (offset < width)
        want = torch.bincount(offset[inside], minlength=width) + 2
        assert inside.sum() > 10 and torch.equal(window.fine[t * width:(t + 1) * width], want)
        under = values[t].abs()[bits[t] < starts[t]]
        assert window.below[t] == pytest.approx(1 + float(under.double().sum()), rel=1e-12)


@pytest.mark.parametrize("threads", [1, 4])
@needs_kernels
def test_order_histogram_and_window_count_the_order_keys_of_values_of_any_sign(monkeypatch: pytest.MonkeyPatch,
                                                                                threads: int) -> None:
    monkeypatch.setattr(kernels, "threads", lambda: threads)
    g = torch.Generator().manual_seed(6)
    n = 3 * (1 << 18) + 4101
    values = torch.randint(-300, 301, (3, n), generator=g).float() / 64 * torch.tensor([[1e-3], [1.0], [1e3]])
    values[0, :5] = torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), float("nan")])
    values[1, 9] = -float("nan")
    keys = topk.order_keys(values)  # the keys torch makes, ordering like the values (−0.0 as +0.0)
    counts = torch.full((3 << 16,), 5, dtype=torch.int64)
    spare = kernels.SpareCounts(counts)
    kernels.order_histogram(list(values), counts, None, spare)
    spare.flush()
    for t in range(3):
        assert torch.equal(counts[t << 16:(t + 1) << 16], torch.bincount(keys[t] >> 16, minlength=1 << 16) + 5)
    # a window of two bins' keys from that of −2 · scale on (values a little above it), in two calls
    starts = torch.stack([keys[t][(values[t] == -128 / 64 * scale).nonzero()[0, 0]]
                          for t, scale in enumerate((1e-3, 1.0, 1e3))]).contiguous()
    window = kernels.Window(starts, 1 << 17, torch.full((3 << 17,), 2, dtype=torch.int64),
                            torch.zeros(3, dtype=torch.float64))
    spare = kernels.SpareCounts(None, window)
    for part in (slice(0, n // 2), slice(n // 2, None)):
        kernels.order_window([v[part].contiguous() for v in values], window, spare)
    spare.flush()
    for t in range(3):
        offset = keys[t] - starts[t]
        inside = (offset >= 0) & (offset < window.width)
        want = torch.bincount(offset[inside], minlength=window.width) + 2
        assert torch.equal(window.fine[t * window.width:(t + 1) * window.width], want)
        assert 1000 < inside.sum() < n // 100


def neuron_inputs(out: int, width: int, dtype: torch.dtype, num_tasks: int, seed: int = 0) -> list[torch.Tensor]:
    return [x.reshape(out, width) for x in inputs(out * width, dtype, num_tasks, seed)]


def reference_q(rows: list[torch.Tensor], thresholds: torch.Tensor | None) -> torch.Tensor:
    """Q = [τ_1; …; τ_T; w0] per row (out, T+1, d) in float64, τ trimmed as the torch path trims it."""
    base, deltas = stats.float_task_vectors(rows, CPU)
    if thresholds is not None:
        deltas = stats.trimmed(deltas, thresholds)
    return torch.cat([deltas, base.unsqueeze(0)]).transpose(0, 1).double()


NEURON_SHAPES = [(1, 1), (5, 7), (3, 8), (17, 13), (2, 4096 + 9), (0, 8)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("num_tasks", [1, 3, 5, 8, 16])  # past 5 tasks: through the float64 buffer, in groups
@pytest.mark.parametrize("shape", NEURON_SHAPES)
@pytest.mark.parametrize("trim", [False, True])
@pytest.mark.usefixtures("float16_conversion")
def test_neuron_gram_is_q_qt_per_row(dtype: torch.dtype, num_tasks: int, shape: tuple[int, int], trim: bool) -> None:
    rows = neuron_inputs(*shape, dtype, num_tasks)
    thresholds = torch.linspace(0.002, 0.012, num_tasks) if trim else None
    gram, l1, l2 = kernels.neuron_gram(rows, thresholds)
    q = reference_q(rows, thresholds)
    want = q @ q.transpose(1, 2)
    assert gram.shape == want.shape and torch.equal(gram, gram.transpose(1, 2))
    # exact products, float64 sums in another order: off by at most width · 2^-52 of the sum of |products|
    bound = shape[1] * 2.0 ** -52 * (q.abs() @ q.abs().transpose(1, 2))
    assert bool(((gram - want).abs() <= bound).all())
    want_l1, want_l2 = f64_norms([r.reshape(-1) for r in rows])
    torch.testing.assert_close(l1, want_l1, rtol=1e-6, atol=0)
    torch.testing.assert_close(l2, want_l2, rtol=1e-6, atol=0)


def reference_neuron_output(rows: list[torch.Tensor], thresholds: torch.Tensor | None, z: torch.Tensor,
                            coefficient: torch.Tensor, lambda1: float, lambda2: float, dtype: torch.dtype
                            ) -> tuple[torch.Tensor, float, float, float]:
    """The torch path's operations (neuron_merge, TensorParts.combine, merge_piece), τ̄⊥ summed over Q's rows
    in order in float64 as the kernel adds them."""
    q = reference_q(rows, thresholds)
    orthogonal = z[:, 0:1] * q[:, 0]
    for s in range(1, q.shape[1]):
        orthogonal = orthogonal + z[:, s:s + 1] * q[:, s]
    orthogonal = orthogonal.float()
    base = rows[0].float()
    parallel = coefficient.float().unsqueeze(1) * base
    delta = parallel * lambda1
    delta.add_(orthogonal * lambda2)
    return ((base + delta).to(dtype), float(delta.double().norm()), float(parallel.double().square().sum()),
            float(orthogonal.double().square().sum()))


@pytest.mark.parametrize("dtype, out_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                              (torch.float32, torch.bfloat16), (torch.float32, torch.float32),
                                              (torch.float16, torch.float16), (torch.float16, torch.float32),
                                              (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("num_tasks", [1, 3, 5, 8])
@pytest.mark.parametrize("shape", NEURON_SHAPES)
@pytest.mark.usefixtures("float16_conversion")
def test_neuron_output_gives_the_bytes_of_the_torch_operations(dtype: torch.dtype, out_dtype: torch.dtype,
                                                               num_tasks: int, shape: tuple[int, int]) -> None:
    rows = neuron_inputs(*shape, dtype, num_tasks, seed=1)
    g = torch.Generator().manual_seed(2)
    z = torch.randn(shape[0], num_tasks + 1, generator=g, dtype=torch.float64)
    coefficient = torch.randn(shape[0], generator=g)
    thresholds = torch.linspace(0.002, 0.012, num_tasks)
    got = kernels.neuron_output(rows, thresholds, z, coefficient, 0.7, 2.5, out_dtype)
    out, delta_norm, parallel_sq, orthogonal_sq = reference_neuron_output(rows, thresholds, z, coefficient, 0.7, 2.5,
                                                                          out_dtype)
    assert got.out.dtype == out_dtype and torch.equal(got.out.view(torch.uint8), out.view(torch.uint8))
    assert got.delta_norm == pytest.approx(delta_norm, rel=1e-6)
    assert got.parallel_sq == pytest.approx(parallel_sq, rel=1e-6)
    assert got.orthogonal_sq == pytest.approx(orthogonal_sq, rel=1e-6)


@pytest.mark.parametrize("threads", [1, 3, 4])  # 3: four parts taken by three threads as they come free
def test_neuron_kernels_split_rows_over_threads_with_the_same_results(monkeypatch: pytest.MonkeyPatch,
                                                                      threads: int) -> None:
    rows = neuron_inputs(3 * 64 + 5, 4096 + 8, torch.bfloat16, 3)  # 2^18 entries per part: four parts
    thresholds = torch.tensor([0.004, 0.0, 0.01])
    z = torch.randn(rows[0].shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    coefficient = torch.randn(rows[0].shape[0], generator=torch.Generator().manual_seed(4))
    monkeypatch.setattr(kernels, "threads", lambda: 1)
    gram, l1, l2sq = kernels.neuron_gram(rows, thresholds)
    out = kernels.neuron_output(rows, thresholds, z, coefficient, 0.0, 1.5, torch.bfloat16)
    monkeypatch.setattr(kernels, "threads", lambda: threads)
    split_gram, split_l1, split_l2sq = kernels.neuron_gram(rows, thresholds)
    split = kernels.neuron_output(rows, thresholds, z, coefficient, 0.0, 1.5, torch.bfloat16)
    assert torch.equal(split_gram, gram) and torch.equal(split.out, out.out)  # a row's sums never split
    # the parts, and so the order of the sums over rows, do not depend on the threads
    assert torch.equal(split_l1, l1) and torch.equal(split_l2sq, l2sq)
    assert (split.delta_norm, split.parallel_sq, split.orthogonal_sq) == (out.delta_norm, out.parallel_sq,
                                                                          out.orthogonal_sq)


@needs_kernels
def test_neuron_kernels_apply_to_rows_of_at_most_16_tasks() -> None:
    assert kernels.neuron_applies(neuron_inputs(4, 8, torch.bfloat16, 16), CPU)
    assert not kernels.neuron_applies(neuron_inputs(4, 8, torch.bfloat16, 17), CPU)
    assert not kernels.neuron_applies([r.reshape(-1) for r in neuron_inputs(4, 8, torch.bfloat16, 2)], CPU)
    assert not kernels.neuron_applies([r.t() for r in neuron_inputs(4, 8, torch.bfloat16, 2)], CPU)


@pytest.mark.parametrize("merge_fn", ["elect_mean", "sum"])
def test_merge_split_over_threads_gives_the_same_result(monkeypatch: pytest.MonkeyPatch, merge_fn: str) -> None:
    n = 3 * (1 << 18) + 4097  # three parts of whole chunks and a short one
    tensors = cancelling_inputs(n, torch.bfloat16, seed=1)
    masks = [torch.rand(n, generator=torch.Generator().manual_seed(t)) < 0.5 for t in range(4)]
    args = (tensors, torch.ones(4), merge_fn, torch.bfloat16, 0.9, torch.tensor([0.004, 0.0, 0.01, 0.0]), -1.0)
    results = []
    for threads in (1, 4, 3):  # 3: four parts taken by three threads as they come free
        monkeypatch.setattr(kernels, "threads", lambda: threads)
        for drops in (None, masks):
            results.append(kernels.merge(*args, conflicts=True, ties=True, drops=drops, keep=0.5))
    for one, split in ((results[0], results[2]), (results[1], results[3]), (results[0], results[4]),
                       (results[1], results[5])):
        assert torch.equal(one.out, split.out) and torch.equal(one.ties, split.ties)
        assert (one.sign_total, one.conflicts) == (split.sign_total, split.conflicts)
        # the parts, and so the order of the float64 sums, do not depend on the threads
        assert torch.equal(one.l1, split.l1) and torch.equal(one.l2, split.l2)
        assert one.delta_norm == split.delta_norm
    out, _, conflict, total, ties = torch_merge(*args[:-1], args[-1])
    assert torch.equal(results[2].out, out) and results[2].conflicts / n == conflict
    if merge_fn == "elect_mean":
        assert torch.equal(results[2].ties, ties) and results[2].sign_total == total
        assert (ties > 3 * (1 << 18)).any()  # ties in every part


@needs_kernels
def test_the_sweeps_float64_sums_are_the_same_bits_on_any_number_of_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts depend on the size alone and their sums are added in part order: a report's figures (L1 norms,
    capped sums, σ_t) do not change with OMP_NUM_THREADS, nor with which thread came free first."""
    n = 5 * (1 << 18) + 4097  # five whole parts and a short one: 1 to 4 threads share them unevenly
    g = torch.Generator().manual_seed(5)
    base = torch.randn(n, generator=g)
    # differences over 30 binades: their float64 sums are not exact, so an order of adding shows in the last bits
    tensors = [base] + [base + torch.randn(n, generator=g) * 2.0 ** torch.randint(-30, 0, (n,), generator=g)
                        for _ in range(3)]
    got = []
    for threads in (1, 2, 3, 4):
        monkeypatch.setattr(kernels, "threads", lambda: threads)
        counts, l1 = torch.zeros(3 << 16, dtype=torch.int64), torch.zeros(3, dtype=torch.float64)
        starts = torch.tensor([0x3C000000, 0x3B800000, 0x3C800000], dtype=torch.int64)
        window = kernels.Window(starts, 3 << 16, torch.zeros(9 << 16, dtype=torch.int64),
                                torch.zeros(3, dtype=torch.float64))
        spare = kernels.SpareCounts(counts, window)
        kernels.magnitude_histogram(tensors[1:], counts, l1, tensors[0], window, spare)
        spare.flush()
        _, _, norm1, norm2 = kernels.task_vectors_and_norms(tensors)
        got.append((counts, window.fine, l1.tolist(), window.below.tolist(), norm1.tolist(), norm2.tolist(),
                    kernels.count_and_sums(tensors[2], 0.01, tensors[0])))
    for other in got[1:]:
        assert torch.equal(other[0], got[0][0]) and torch.equal(other[1], got[0][1])
        assert other[2:] == got[0][2:]  # float64 sums equal to the last bit
    assert got[0][1].sum() > 0 and got[0][3][0] > 0  # the window held entries and had entries below it


def test_task_vectors_split_over_threads_give_the_same_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    tensors = inputs(3 * (1 << 18) + 4097, torch.bfloat16)
    want_base, want_deltas, _, _ = torch_path(monkeypatch, stats.task_vectors_and_norms, tensors, CPU)
    want_l1, want_l2 = f64_norms(tensors)
    for threads in (1, 4):
        monkeypatch.setattr(kernels, "threads", lambda: threads)
        base, deltas, l1, l2 = kernels.task_vectors_and_norms(tensors)
        assert torch.equal(base, want_base) and torch.equal(deltas, want_deltas)
        torch.testing.assert_close(l1, want_l1, rtol=1e-7, atol=0)
        torch.testing.assert_close(l2, want_l2, rtol=1e-7, atol=0)
        assert torch.equal(kernels.abs_difference(tensors[2], tensors[0]), want_deltas[1].abs())


@pytest.mark.parametrize("length", [0, 1, 2, 7, 9, 4097, 3 * (1 << 18) + 5])  # the last: parts over 4 threads
@pytest.mark.parametrize("threads", [1, 3, 4])
def test_dare_keep_draws_what_numpy_pcg64_draws(monkeypatch: pytest.MonkeyPatch, length: int, threads: int) -> None:
    np = pytest.importorskip("numpy")
    monkeypatch.setattr(kernels, "threads", lambda: threads)
    for seed, bound in [(0, 0), (7, 1), (11, 1 << 31), (123456789, (1 << 32) - 1), (5, int(0.3 * 2**32))]:
        raw = np.random.PCG64(seed).random_raw((length + 1) // 2).astype("<u8")
        want = torch.from_numpy(np.less(raw.view("<u4")[:length], bound))
        state = np.random.PCG64(seed).state["state"]
        assert torch.equal(kernels.dare_keep(state["state"], state["inc"], length, bound), want)


@needs_kernels
@pytest.mark.usefixtures("float16_conversion")
def test_float16_loads_are_exact_for_every_bit_pattern() -> None:
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    out = kernels.merge([torch.zeros_like(x), x], torch.ones(1), "sum", torch.float32).out  # 0 + (x − 0)
    want = x.float()
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan) and torch.equal(out[~nan], want[~nan])


@needs_kernels
@pytest.mark.usefixtures("float16_conversion")
def test_float16_stores_round_like_torch() -> None:
    finite = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    step = finite[1:] - finite[:-1]
    mid = finite[:-1] + step / 2  # exactly halfway: ties to even
    values = torch.cat([finite, mid, torch.nextafter(mid, torch.full_like(mid, -1.0)),
                        torch.nextafter(mid, torch.full_like(mid, 2.0**20)),
                        torch.tensor([65504.0, 65519.99, 65520.0, 1e6, 2.0**-25, 2.0**-26, 1e-40, 2.0**-149,
                                      float("inf"), float("nan")])])
    values = torch.cat([values, -values[values != 0]])  # (0 + (−0 − 0) is +0: no −0 input)
    out = kernels.merge([torch.zeros_like(values), values], torch.ones(1), "sum", torch.float16).out
    want = values.to(torch.float16)
    nan = want.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan].view(torch.int16), want[~nan].view(torch.int16))


@needs_kernels
def test_cpu_sweeps_say_what_does_the_work(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernels.cpu_sweeps() == "C kernels"
    monkeypatch.setattr(kernels, "ENABLED", False)
    monkeypatch.setenv("NEUROMERGE_KERNELS", "0")
    assert kernels.cpu_sweeps() == "torch operations: as NEUROMERGE_KERNELS=0 asks"

    class OldCpu:
        FULL_SPEED = 0

    monkeypatch.setattr(kernels, "_kernels", OldCpu)
    assert kernels.cpu_sweeps() == ("torch operations: this CPU has no AVX2/FMA (x86-64-v3), which the C kernels "
                                    "need to beat torch")
    monkeypatch.setattr(kernels, "_kernels", None)
    assert kernels.cpu_sweeps().startswith("torch operations: the C kernels are not built")
