"""Benchmark: neuromerge against the I/O floor and against mergekit on synthetic Llama checkpoints.

    python scripts/bench_engine.py --size 0.5b --tasks 3 --scratch /tmp/nmbench [--repeat 2]

Builds (once, reused when present) a base and T fine-tuned Llama-shaped checkpoints in bfloat16 (or
float16: --dtype), sharded safetensors with an index and a transformers LlamaConfig, under --scratch
(never in the repository). Then, with the inputs in the page cache (one warm-up read first, ``sync`` before every
timed run so that no earlier write-back is pending):

- the I/O floor: read every input byte once, then write one file of the output's size;
- ``python -m neuromerge_cli run`` for task_arithmetic, ties (per-tensor and global trim), dare_ties
  and neuromerging (when the checkout has it): wall time and peak RSS (GNU time);
- the same merges with mergekit (``mergekit-yaml``) from its own virtualenv under --scratch, which
  the script creates (CPU torch pinned first, then ``pip install mergekit``) unless --no-mergekit.

Prints one table with the ratios neuromerge/floor and neuromerge/mergekit (best of --repeat runs).

``--cold`` keeps the inputs out of the page cache instead, the floor's read and every timed command
reading them from disk (a thread drops their cached pages every EVICT_S seconds while a command runs,
``posix_fadvise(DONTNEED)``): how a merge behaves on models larger than the machine's RAM, where every
read of the inputs is a read from disk.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
TORCH_PIN = "torch==2.13.0"


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Llama state-dict names and shapes, in the order transformers saves them."""
        h, i = self.hidden, self.intermediate
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (h, h)),
                    (p + "self_attn.v_proj.weight", (h, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i)),
                    (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def params(self) -> int:
        return sum(_numel(s) for _, s in self.tensors())

    @property
    def largest(self) -> int:
        return max(_numel(s) for _, s in self.tensors())

    def config(self, dtype: str) -> dict:
        from transformers import LlamaConfig

        cfg = LlamaConfig(hidden_size=self.hidden, intermediate_size=self.intermediate,
                          num_hidden_layers=self.layers, num_attention_heads=self.heads,
                          num_key_value_heads=self.heads, vocab_size=self.vocab,
                          max_position_embeddings=2048, tie_word_embeddings=False).to_dict()
        cfg["architectures"] = ["LlamaForCausalLM"]
        cfg["torch_dtype"] = dtype
        return cfg


SIZES = {
    "tiny": Shape(256, 688, 2, 4096, 4),  # ~4M parameters: a smoke run
    "small": Shape(512, 1376, 8, 32000, 8),  # ~59M
    "0.5b": Shape(1024, 4096, 24, 32000, 16),  # ~0.47B
    "1.5b": Shape(2048, 5632, 26, 32000, 16),  # ~1.47B
}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def build_family(folder: Path, shape: Shape, tasks: int, shard_bytes: int, dtype: str) -> list[Path]:
    """Base + ``tasks`` fine-tuned checkpoints (``dtype``, sharded); reused when already complete."""
    from safetensors.torch import save_file

    stored = getattr(torch, dtype)
    models = [folder / "base"] + [folder / f"task{t}" for t in range(tasks)]
    if all((m / "model.safetensors.index.json").exists() for m in models):
        return models
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, s in shape.tensors():
        nbytes = _numel(s) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, s))
        size += nbytes
    for m in models:
        m.mkdir(parents=True, exist_ok=True)
        (m / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    weight_map: dict[str, str] = {}
    for g, group in enumerate(groups):
        file = f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors"
        gen = torch.Generator().manual_seed(g)
        base = {}
        for name, s in group:
            base[name] = (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=gen) * 0.02).to(stored)
            weight_map[name] = file
        save_file(base, str(models[0] / file), metadata={"format": "pt"})
        for t, m in enumerate(models[1:]):
            gen = torch.Generator().manual_seed(1000 * (t + 1) + g)
            tuned = {name: (w.float() + torch.randn(w.shape, generator=gen) * 0.002).to(stored)
                     for name, w in base.items()}
            save_file(tuned, str(m / file), metadata={"format": "pt"})
            del tuned
        del base
        print(f"  built shard {g + 1}/{len(groups)}", file=sys.stderr, flush=True)
    total = shape.params * 2
    for m in models:
        (m / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return models


def input_files(models: list[Path]) -> list[Path]:
    return [f for m in models for f in sorted(m.glob("*.safetensors"))]


EVICT_S = 0.25  # seconds between two evictions of the inputs' cached pages (--cold)


def evict(files: list[Path]) -> None:
    """Drop the page cache's clean pages of ``files``."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@contextlib.contextmanager
def kept_cold(files: list[Path], on: bool) -> Iterator[None]:
    """With ``on``: ``files`` evicted now and every EVICT_S seconds until the block ends (else nothing)."""
    if not on:
        yield
        return
    evict(files)
    done = threading.Event()

    def loop() -> None:
        while not done.wait(EVICT_S):
            evict(files)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def io_floor(files: list[Path], bytes_out: int, scratch: Path, cold: bool = False) -> tuple[float, float, float]:
    """Seconds to read every input byte once, to write ``bytes_out`` bytes to a new file, and then to
    flush that file to disk (fsync: neuromerge publishes its output only once it is on disk).

    The buffer is page-aligned (an anonymous mapping): the kernel copies from the page cache into a
    bytearray's 16-byte-aligned memory at a quarter of the speed (2-core machine, 2026-11-24: 2.5 against
    about 10 GB/s), which made the floor of the benchmarks before that date 2-3 times too long."""
    buf = memoryview(mmap.mmap(-1, 64 << 20))
    os.sync()
    if cold:
        evict(files)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    t1 = time.perf_counter()
    target = scratch / "floor.bin"
    with open(target, "wb", buffering=0) as fh:
        left = bytes_out
        while left > 0:
            left -= fh.write(buf[: min(left, len(buf))])
        t2 = time.perf_counter()
        os.fsync(fh.fileno())
    t3 = time.perf_counter()
    target.unlink()
    return t1 - t0, t2 - t1, t3 - t2


GNU_TIME = Path("/usr/bin/time")
# Where GNU time is missing (the GPU machines' image): a small Python process that runs the command and writes
# its peak RSS (KiB) and CPU seconds as GNU time's "%M %U %S" would.
RUSAGE_LAUNCHER = """import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, use = os.wait4(pid, 0)
open(sys.argv[1], "w").write(f"{use.ru_maxrss} {use.ru_utime} {use.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


class Timing(NamedTuple):
    wall: float  # seconds
    rss: int  # peak resident bytes
    cpu: float  # user + system seconds: on a shared machine they vary less than wall time


def timed(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Timing:
    """Wall seconds, peak RSS and CPU seconds of a command (from GNU time, or a small launcher where it is
    missing; a child forked from this process would report this process's)."""
    os.sync()
    rss_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"nmbench-rss-{os.getpid()}"
    measure = [str(GNU_TIME), "-f", "%M %U %S", "-o", str(rss_file)] if GNU_TIME.exists() else \
        [sys.executable, "-c", RUSAGE_LAUNCHER, str(rss_file)]
    t0 = time.perf_counter()
    proc = subprocess.run([*measure, *cmd], env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rss_kib, user, system = rss_file.read_text().split()[-3:]
    rss_file.unlink()
    timing = Timing(wall, int(rss_kib) * 1024, float(user) + float(system))
    print(f"  {Path(cmd[0]).name} {' '.join(cmd[1:4])}: wall {wall:.1f} s, CPU {timing.cpu:.1f} s, "
          f"peak RSS {timing.rss / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    return timing


def neuromerge_methods() -> set[str]:
    sys.path.insert(0, str(ROOT))
    from neuromerge_cli.methods import METHODS

    return set(METHODS)


def recipes(models: list[Path], dtype: str) -> dict[str, dict]:
    base, tasks = str(models[0]), [{"model": str(m)} for m in models[1:]]
    common = {"base_model": base, "models": tasks, "dtype": dtype}
    return {
        "task_arithmetic": {**common, "method": "task_arithmetic"},
        "ties (tensor trim)": {**common, "method": "ties", "parameters": {"density": 0.2, "mask_scope": "tensor"}},
        "ties (global trim)": {**common, "method": "ties", "parameters": {"density": 0.2, "mask_scope": "global"}},
        "dare_ties": {**common, "method": "dare_ties", "parameters": {"density": 0.2}},
        "neuromerging": {**common, "method": "neuromerging"},
        "pcb": {**common, "method": "pcb", "parameters": {"ratio": 0.1}},  # no mergekit counterpart
    }


def mergekit_configs(models: list[Path], dtype: str) -> dict[str, dict]:
    def cfg(method: str, params: dict) -> dict:
        return {"merge_method": method, "base_model": str(models[0]), "dtype": dtype,
                "models": [{"model": str(m), "parameters": {"weight": 1.0, **params}} for m in models[1:]]}

    return {
        "task_arithmetic": cfg("task_arithmetic", {}),
        "ties (tensor trim)": cfg("ties", {"density": 0.2}),
        "ties (global trim)": cfg("ties", {"density": 0.2}),  # mergekit only trims per tensor
        "dare_ties": cfg("dare_ties", {"density": 0.2}),
    }


def ensure_mergekit(venv: Path) -> Path:
    """A throwaway virtualenv with the CPU torch pinned first, then mergekit; returns mergekit-yaml."""
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [TORCH_PIN], check=True)
    subprocess.run(pip + ["mergekit"], check=True)
    torch_version = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch; print(torch.__version__)"],
                                   check=True, capture_output=True, text=True).stdout.strip()
    if "+cpu" not in torch_version and not torch_version.startswith(TORCH_PIN.split("==")[1]):
        raise RuntimeError(f"mergekit pulled torch {torch_version}, not the pinned CPU build")
    return exe


def package_version(venv: Path, name: str) -> str:
    out = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "show", name], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Version:")), "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16", help="of the checkpoints")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/nmbench"))
    ap.add_argument("--shard-size", type=int, default=1 << 30, help="input shard size in bytes")
    ap.add_argument("--repeat", type=int, default=1, help="runs per command; the best is reported")
    ap.add_argument("--methods", default="", help="comma-separated subset of the rows")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--no-neuromerge", action="store_true", help="time mergekit only")
    ap.add_argument("--mergekit-venv", type=Path, help="its virtualenv (default: SCRATCH/mergekit-venv)")
    ap.add_argument("--neuromerge-args", default="--device cpu", help="extra arguments to `neuromerge run`")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--cold", action="store_true", help="inputs read from disk, not the page cache (see above)")
    args = ap.parse_args()
    if ROOT in args.scratch.resolve().parents:
        ap.error("--scratch must be outside the repository")

    shape = SIZES[args.size]
    work = args.scratch / (f"{args.size}-T{args.tasks}" + ("" if args.dtype == "bfloat16" else f"-{args.dtype}"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{args.size}: {shape.params / 1e9:.3f}B parameters, largest tensor {shape.largest:,}; T={args.tasks}",
          file=sys.stderr)
    models = build_family(work / "models", shape, args.tasks, args.shard_size, args.dtype)
    files = input_files(models)
    bytes_in = sum(f.stat().st_size for f in files)
    bytes_out = shape.params * 2
    io_floor(files, bytes_out, work)  # warm-up: inputs into the page cache (or the disk's own cache)
    floors = [io_floor(files, bytes_out, work, args.cold) for _ in range(max(args.repeat, 2))]
    read_s, write_s, sync_s = (min(f[k] for f in floors) for k in range(3))
    floor = read_s + write_s
    start = min((timed([sys.executable, "-c", "import torch, neuromerge_cli.cli"], cwd=ROOT) for _ in range(2)),
                key=lambda r: r.wall)
    startup = start.wall

    wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
    have = neuromerge_methods()
    rows = {k: v for k, v in recipes(models, args.dtype).items() if (not wanted or k in wanted)}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    import yaml

    results: dict[str, dict] = {}
    for label, recipe in rows.items():
        if recipe["method"] not in have:
            print(f"skip {label}: method '{recipe['method']}' is not in this checkout", file=sys.stderr)
            continue
        if args.no_neuromerge:
            results[label] = {}
            continue
        path = work / f"recipe-{recipe['method']}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        out = work / "out-neuromerge"
        cmd = [sys.executable, "-m", "neuromerge_cli", "run", str(path), "-o", str(out), "--overwrite", "-q",
               *args.neuromerge_args.split()]
        runs = []
        for _ in range(args.repeat):  # like mergekit's below, each run starts without an output to replace
            subprocess.run(["rm", "-rf", str(out)], check=True)
            with kept_cold(files, args.cold):
                runs.append(timed(cmd, env=env, cwd=ROOT))
        best = min(runs, key=lambda r: r.wall)
        # the cores the merge kept busy on average, the interpreter's start-up (one core) left out of both
        merge_s = best.wall - startup
        busy = (best.cpu - start.cpu) / merge_s if merge_s > 0.2 else None  # too short to tell
        results[label] = {"neuromerge_s": best.wall, "neuromerge_rss": max(r.rss for r in runs), "cores_busy": busy}
        print(f"neuromerge {label}: {results[label]}", file=sys.stderr, flush=True)

    mergekit_version = None
    if not args.no_mergekit:
        venv = args.mergekit_venv or args.scratch / "mergekit-venv"
        exe = ensure_mergekit(venv)
        mergekit_version = f"mergekit {package_version(venv, 'mergekit')}, torch {package_version(venv, 'torch')}"
        done: dict[str, tuple[float, int]] = {}
        for label, cfg in mergekit_configs(models, args.dtype).items():
            if label not in results:
                continue
            key = json.dumps(cfg, sort_keys=True)
            if key not in done:
                path = work / f"mergekit-{cfg['merge_method']}.yaml"
                path.write_text(yaml.safe_dump(cfg))
                out = work / "out-mergekit"
                cmd = [str(exe), str(path), str(out), "--no-copy-tokenizer"]
                runs = []
                for _ in range(args.repeat):
                    subprocess.run(["rm", "-rf", str(out)], check=True)
                    with kept_cold(files, args.cold):
                        runs.append(timed(cmd))
                done[key] = (min(r.wall for r in runs), max(r.rss for r in runs))
                print(f"mergekit {label}: {done[key]}", file=sys.stderr, flush=True)
            results[label]["mergekit_s"], results[label]["mergekit_rss"] = done[key]

    budget = 1.5 * (args.tasks + 1) * shape.largest * 4 + 0.5e9
    print(f"\n{args.size} ({shape.params / 1e9:.2f}B parameters, T={args.tasks}, {args.dtype}): "
          f"{bytes_in / 1e9:.2f} GB in, {bytes_out / 1e9:.2f} GB out; floor {floor:.2f} s "
          f"(read {read_s:.2f} s + write {write_s:.2f} s, {'from disk' if args.cold else 'page cache'}; + fsync {sync_s:.2f} s: durable floor "
          f"{floor + sync_s:.2f} s); interpreter + imports {startup:.2f} s; "
          f"RSS budget {budget / 2**30:.2f} GiB; {os.cpu_count()} cores" + (f"; {mergekit_version}" if mergekit_version else ""))
    print("x floor: (neuromerge s - interpreter + imports) / floor, the issue's measure; x durable: the same over "
          "the durable floor (neuromerge's time includes flushing its output to disk before publishing it); busy: the "
          "cores the merge kept busy on average ((CPU s - start-up's) / (wall s - start-up's)), at the core count: "
          "compute-bound")
    head = (f"{'method':<20} {'neuromerge s':>12} {'RSS GiB':>8} {'busy':>5} {'x floor':>8} {'x durable':>9} {'mergekit s':>10} "
            f"{'RSS GiB':>8} {'mk/nm':>7}")
    print(head)
    print("-" * len(head))

    def fmt(x: float | None, width: int) -> str:
        return f"{x:>{width}.2f}" if x is not None else f"{'-':>{width}}"

    for label, r in results.items():
        mk, nm = r.get("mergekit_s"), r.get("neuromerge_s")
        ratio, durable = ((nm - startup) / floor, (nm - startup) / (floor + sync_s)) if nm else (0.0, 0.0)
        print(f"{label:<20} "
              + (f"{nm:>12.2f} {r['neuromerge_rss'] / 2**30:>8.2f} {fmt(r['cores_busy'], 5)} {ratio:>8.2f} {durable:>9.2f} "
                 if nm else f"{'-':>12} {'-':>8} {'-':>5} {'-':>8} {'-':>9} ")
              + (f"{mk:>10.2f} {r['mergekit_rss'] / 2**30:>8.2f} " if mk else f"{'-':>10} {'-':>8} ")
              + (f"{mk / nm:>7.1f}" if mk and nm else f"{'-':>7}"))
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "params": shape.params, "tasks": args.tasks,
                                         "floor_s": floor, "read_s": read_s, "write_s": write_s, "fsync_s": sync_s,
                                         "startup_s": startup, "startup_cpu_s": start.cpu, "cores": os.cpu_count(),
                                         "rss_budget": budget, "mergekit": mergekit_version, "cold": args.cold,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    main()
