"""Real (base, full fine-tune) pairs for the benchmarks, made here on the CPU and cached.

No pretrained weights can be downloaded on this machine, so the pairs are made from scratch:

1. a small Llama-architecture model (char-level, ~0.8M parameters) is **pre-trained** on synthetic but structured
   text: sentences from a small grammar, sentences with numbers, key=value records;
2. it is **fully fine-tuned** (every parameter, AdamW) on each of two tasks whose quality is measured exactly:

   * ``add``: ``"47+85="`` -> the sum with its digits least-significant first, zero-padded to 3 digits
     (``"231"`` for 132): 2-digit addition with carries, answered in text. (Writing the sum from its last digit is the usual
     trick that lets a tiny model learn carries in minutes; the task is still exact-match arithmetic.)
   * ``extract``: ``"job=cook age=42 name=kim city=oslo|city?"`` -> ``"oslo."``: extraction of one field of a
     record, with the fields in random order.

   The base never sees either question format, so it scores ~0 on both; each fine-tune scores far above it.

Splits: ``test`` and ``val`` prompts are drawn first and every training prompt that equals one of them is dropped,
so the three are disjoint. Held-out text for the KL measurements comes from the pre-training generator with a
seed the pre-training never used.

Everything is cached under ``benchmarks/.cache/pairs/`` (git-ignored): one folder per model
(``save_pretrained`` safetensors, written to a temp folder and renamed) and ``data.json`` with the splits. The cache
is keyed on :data:`RECIPE` (a hash of every setting): change a setting and the pairs are rebuilt.

Run ``python benchmarks/pairs.py`` to build (or check) the cache; the other scripts call :func:`load_pairs`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

CACHE = Path(os.environ.get("IMPART_BENCH_CACHE", Path(__file__).resolve().parent / ".cache"))
TASKS = ("add", "extract")

# ----------------------------------------------------------------------------------------------- tokenizer
CHARS = "\n abcdefghijklmnopqrstuvwxyz0123456789=+?|.,:"
PAD = 0  # "\n" doubles as padding: losses and metrics never look at padded positions
STOI = {c: i for i, c in enumerate(CHARS)}
VOCAB_SIZE = 48  # len(CHARS) rounded up


def encode(text: str) -> list[int]:
    """Char-level token ids of ``text`` (every char must be in :data:`CHARS`)."""
    return [STOI[c] for c in text]


def decode(ids: list[int]) -> str:
    return "".join(CHARS[i] if i < len(CHARS) else "#" for i in ids)


# ----------------------------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class Recipe:
    """Every setting that determines the pairs (its hash keys the cache)."""

    hidden_size: int = 128
    intermediate_size: int = 344
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    seq_len: int = 128
    pretrain_steps: int = 300
    pretrain_batch: int = 24
    pretrain_lr: float = 3e-3
    finetune_steps: dict = field(default_factory=lambda: {"add": 800, "extract": 500})
    finetune_batch: int = 64
    # extract learns at a 10x smaller step, so its deltas are small next to the weights, as an LLM SFT's are;
    # add needs the large one (at 2e-4 it stays on its loss plateau): the two pairs span both regimes.
    finetune_lr: dict = field(default_factory=lambda: {"add": 2e-3, "extract": 2e-4})
    n_val: int = 200
    n_test: int = 400
    n_heldout: int = 32  # sequences of seq_len chars for the KL
    seed: int = 1234
    version: int = 2  # bump when the text or task generators change (they are not part of the fields)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


RECIPE = Recipe()

# ----------------------------------------------------------------------------------------------- text
NAMES = [
    "kim",
    "tom",
    "ana",
    "bob",
    "eva",
    "ian",
    "joe",
    "lea",
    "max",
    "mia",
    "ned",
    "ola",
    "pia",
    "rex",
    "sam",
    "tia",
    "uma",
    "vic",
    "zoe",
    "amy",
]
CITIES = [
    "oslo",
    "rome",
    "lima",
    "kiev",
    "bern",
    "doha",
    "riga",
    "baku",
    "oran",
    "lyon",
    "kobe",
    "nice",
    "pune",
    "faro",
]
JOBS = [
    "cook",
    "baker",
    "nurse",
    "pilot",
    "judge",
    "miner",
    "tailor",
    "farmer",
    "poet",
    "clerk",
    "guard",
    "smith",
]
NOUNS = [
    "box",
    "cat",
    "dog",
    "cup",
    "hat",
    "key",
    "map",
    "pen",
    "car",
    "boat",
    "book",
    "lamp",
    "ring",
    "coin",
    "bell",
]
ADJS = ["red", "blue", "green", "old", "new", "big", "small", "dark", "bright", "quiet", "heavy", "round"]
VERBS = ["sees", "takes", "finds", "holds", "moves", "sells", "buys", "paints", "wants", "drops"]
PLACES = [
    "in the park",
    "at home",
    "near the river",
    "in the shop",
    "on the hill",
    "by the road",
    "in the city",
]


def _record(rng: random.Random) -> dict[str, str]:
    return {
        "name": rng.choice(NAMES),
        "city": rng.choice(CITIES),
        "age": str(rng.randint(18, 89)),
        "job": rng.choice(JOBS),
    }


def _record_text(rec: dict[str, str], rng: random.Random) -> str:
    keys = list(rec)
    rng.shuffle(keys)
    return " ".join(f"{k}={rec[k]}" for k in keys)


def general_sentence(rng: random.Random) -> str:
    """One sentence of the pre-training distribution."""
    kind = rng.random()
    if kind < 0.35:
        return (
            f"{rng.choice(NAMES)} {rng.choice(VERBS)} the {rng.choice(ADJS)} {rng.choice(NOUNS)} "
            f"{rng.choice(PLACES)}."
        )
    if kind < 0.6:
        n = rng.randint(0, 999)
        return f"{rng.choice(NAMES)} has {n} {rng.choice(NOUNS)}s and {rng.randint(0, 99)} coins."
    if kind < 0.85:
        return _record_text(_record(rng), rng) + "."
    start = rng.randint(0, 990)
    step = rng.randint(1, 9)
    return "count " + " ".join(str(start + i * step) for i in range(rng.randint(3, 6))) + "."


def general_text(rng: random.Random, n_chars: int) -> str:
    """A stream of sentences, at least ``n_chars`` long."""
    parts, total = [], 0
    while total < n_chars:
        s = general_sentence(rng) + (" " if rng.random() < 0.7 else "\n")
        parts.append(s)
        total += len(s)
    return "".join(parts)


def task_example(task: str, rng: random.Random) -> tuple[str, str]:
    """``(prompt, answer)`` of ``task``; the answer is what exact match is scored on."""
    if task == "add":
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"{a:02d}+{b:02d}=", f"{a + b:03d}"[::-1]
    if task == "extract":
        rec = _record(rng)
        key = rng.choice(list(rec))
        return f"{_record_text(rec, rng)}|{key}?", f"{rec[key]}."
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def task_splits(task: str, recipe: Recipe, n_train: int) -> dict[str, list[tuple[str, str]]]:
    """Disjoint test / val / train examples (by prompt) of ``task``."""
    rng = random.Random(f"{recipe.seed}-{task}-heldout")
    test, val, seen = [], [], set()
    while len(test) < recipe.n_test:
        ex = task_example(task, rng)
        if ex[0] not in seen:
            seen.add(ex[0])
            test.append(ex)
    while len(val) < recipe.n_val:
        ex = task_example(task, rng)
        if ex[0] not in seen:
            seen.add(ex[0])
            val.append(ex)
    rng = random.Random(f"{recipe.seed}-{task}-train")
    train = []
    while len(train) < n_train:
        ex = task_example(task, rng)
        if ex[0] not in seen:
            train.append(ex)
    return {"train": train, "val": val, "test": test}


# ----------------------------------------------------------------------------------------------- batches
def example_batch(examples: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ``(B, T)`` int64 and a bool mask ``(B, T)`` of the positions whose *next* token is part
    of the answer (the positions whose logits exact match and the fine-tuning loss look at)."""
    seqs = [encode(p + a) for p, a in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD, dtype=torch.int64)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, ((prompt, answer), seq) in enumerate(zip(examples, seqs, strict=True)):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, len(prompt) - 1 : len(prompt) + len(answer) - 1] = True
    return ids, mask


def text_batch(text: str, seq_len: int, n: int) -> torch.Tensor:
    """``n`` consecutive chunks of ``seq_len`` chars of ``text`` as ids ``(n, seq_len)`` int64."""
    ids = torch.tensor(encode(text[: n * seq_len]), dtype=torch.int64)
    if ids.numel() < n * seq_len:
        raise ValueError(f"text too short for {n} x {seq_len} chars")
    return ids.view(n, seq_len)


# ----------------------------------------------------------------------------------------------- training
def model_config(recipe: Recipe) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_attention_heads,
        max_position_embeddings=recipe.seq_len,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pretrain(recipe: Recipe) -> LlamaForCausalLM:
    """Pre-train the base on the general text (next-token loss on every position)."""
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(model_config(recipe))
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.pretrain_lr, weight_decay=0.01, betas=(0.9, 0.95))
    rng = random.Random(f"{recipe.seed}-pretrain")
    model.train()
    start = time.time()
    for step in range(recipe.pretrain_steps):
        text = general_text(rng, recipe.pretrain_batch * (recipe.seq_len + 1) + recipe.seq_len)
        offset = rng.randint(0, recipe.seq_len)
        ids = text_batch(text[offset:], recipe.seq_len, recipe.pretrain_batch)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, recipe.pretrain_steps, recipe.pretrain_lr, 50)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == recipe.pretrain_steps - 1:
            _log(f"  pretrain step {step:4d}  loss {loss.item():.3f}  ({time.time() - start:.0f}s)")
    model.eval()
    return model


def answer_loss(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens (positions in ``mask`` predict the next token)."""
    logits = model(input_ids=ids).logits[:, :-1]
    targets = ids[:, 1:]
    m = mask[:, :-1]
    return torch.nn.functional.cross_entropy(logits[m].float(), targets[m])


def finetune(base: LlamaForCausalLM, task: str, recipe: Recipe, train: list[tuple[str, str]]):
    """Full fine-tune of a copy of ``base`` on ``task`` (every parameter; loss on the answer tokens)."""
    torch.manual_seed(recipe.seed + 1 + TASKS.index(task))
    model = LlamaForCausalLM(model_config(recipe))
    model.load_state_dict(base.state_dict())
    lr = recipe.finetune_lr[task]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    steps = recipe.finetune_steps[task]
    model.train()
    start = time.time()
    for step in range(steps):
        batch = train[step * recipe.finetune_batch : (step + 1) * recipe.finetune_batch]
        ids, mask = example_batch(batch)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, 30)
        loss = answer_loss(model, ids, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            _log(f"  finetune {task} step {step:4d}  loss {loss.item():.3f}  ({time.time() - start:.0f}s)")
    model.eval()
    return model


@torch.no_grad()
def exact_match(model: LlamaForCausalLM, examples: list[tuple[str, str]], batch: int = 200) -> float:
    """Greedy exact-match accuracy: an answer is right iff the argmax at every answer position is the answer's
    token given the right prefix, which is exactly when greedy decoding would write the answer."""
    right = 0
    for i in range(0, len(examples), batch):
        ids, mask = example_batch(examples[i : i + batch])
        pred = model(input_ids=ids).logits[:, :-1].argmax(-1)
        ok = (pred == ids[:, 1:]) | ~mask[:, :-1]
        right += int(ok.all(dim=1).sum())
    return right / len(examples)


# ----------------------------------------------------------------------------------------------- cache
def save_folder_atomic(save, path: Path) -> None:
    """Run ``save(tmp_folder)`` and rename the folder to ``path``: a half-written folder is never taken as cached."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        save(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pairs_dir(recipe: Recipe = RECIPE) -> Path:
    return CACHE / "pairs" / recipe.key()


def build_pairs(recipe: Recipe = RECIPE, force: bool = False) -> Path:
    """Build (or reuse) the base, the fine-tunes and the splits; returns the cache folder."""
    out = pairs_dir(recipe)
    manifest = out / "manifest.json"
    if manifest.exists() and not force:
        return out
    torch.set_num_threads(int(os.environ.get("IMPART_BENCH_THREADS", "1")))
    timings = {}
    t0 = time.time()
    _log(f"pre-training the base ({recipe.pretrain_steps} steps) into {out}")
    base = pretrain(recipe)
    timings["pretrain_s"] = time.time() - t0
    save_folder_atomic(base.save_pretrained, out / "base")
    data = {
        "heldout_text": general_text(
            random.Random(f"{recipe.seed}-heldout-text"), recipe.n_heldout * recipe.seq_len
        )
    }
    accuracy = {}
    for task in TASKS:
        n_train = recipe.finetune_steps[task] * recipe.finetune_batch
        splits = task_splits(task, recipe, n_train)
        t0 = time.time()
        ft = finetune(base, task, recipe, splits["train"])
        timings[f"finetune_{task}_s"] = time.time() - t0
        save_folder_atomic(ft.save_pretrained, out / task)
        accuracy[task] = {
            split: {"base": exact_match(base, splits[split]), "finetuned": exact_match(ft, splits[split])}
            for split in ("val", "test")
        }
        _log(f"  {task}: {accuracy[task]}")
        gain = accuracy[task]["test"]["finetuned"] - accuracy[task]["test"]["base"]
        if gain < 0.3:
            raise RuntimeError(
                f"the {task} fine-tune gains only {gain:.2f} accuracy over the base: too little to measure what "
                "compression keeps; raise finetune_steps in Recipe"
            )
        data[task] = {"val": splits["val"], "test": splits["test"]}
    write_json_atomic(data, out / "data.json")
    write_json_atomic(
        {"recipe": asdict(recipe), "key": recipe.key(), "accuracy": accuracy, "timings": timings}, manifest
    )
    return out


@dataclass
class Pairs:
    """The cached pairs, loaded: ``base``, ``finetuned[task]``, splits ``data[task]["val"|"test"]``."""

    path: Path
    base: LlamaForCausalLM
    finetuned: dict[str, LlamaForCausalLM]
    data: dict
    manifest: dict


def load_pairs(recipe: Recipe = RECIPE) -> Pairs:
    """Build the pairs if needed and load them (models in eval mode, float32, CPU)."""
    path = build_pairs(recipe)
    base = LlamaForCausalLM.from_pretrained(path / "base").eval()
    finetuned = {t: LlamaForCausalLM.from_pretrained(path / t).eval() for t in TASKS}
    data = json.loads((path / "data.json").read_text())
    for task in TASKS:
        data[task] = {k: [tuple(e) for e in v] for k, v in data[task].items()}
    return Pairs(path, base, finetuned, data, json.loads((path / "manifest.json").read_text()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    path = build_pairs(force=args.force)
    manifest = json.loads((path / "manifest.json").read_text())
    print(
        json.dumps(
            {"path": str(path), "accuracy": manifest["accuracy"], "timings": manifest["timings"]}, indent=1
        )
    )


if __name__ == "__main__":
    main()
