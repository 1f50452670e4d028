"""Peak memory of ``compress_checkpoints`` on 7B-shaped checkpoints: it must not grow with the number of layers.

For ``N`` and ``2N`` decoder layers, this writes a synthetic (base, fine-tune) pair of Llama checkpoints with the
layer shapes of a 7B Llama (hidden 4096, MLP 11008, 32 heads, bf16, vocabulary 32000 by default; one
safetensors shard per decoder layer), compresses it with ``impart_peft.compress_checkpoints`` in a fresh
subprocess, and reports that subprocess's peak resident memory (``getrusage(RUSAGE_SELF).ru_maxrss`` read by
the child at exit, cross-checked by sampling its RSS with psutil from the parent) beside the size of the pair.
Each pair is deleted before the next is written (``--keep`` keeps them).

Which matrices differ (``--changed``):

* ``shapes`` (default): the fine-tune equals the base except every norm and one matrix of each distinct shape,
  all at the *end* of the model (``q_proj``, ``gate_proj`` and ``down_proj`` of the last decoder layer, and
  ``lm_head``, the largest). Every tensor pair is still read, converted and subtracted (that is where a leak
  would grow with the layers), and every shape's SVD runs after all the others were streamed, so the peak covers
  both. The SVDs of the unchanged matrices are skipped (their delta is zero), which is what makes the run take
  minutes, not hours, on a CPU: one 4096 x 11008 compression takes about two minutes on the shared 2-core box.
* ``all``: every matrix differs (a real full fine-tune; hours on a CPU, minutes with ``--device cuda``).

The fine-tune's changed matrices are ``base + 1e-3 * noise`` (bf16): a full-rank delta, the SVD's worst case.
The decoder layers of the base are one random template scaled per layer (random numbers for gigabytes take long
on a shared CPU; what is measured is memory, which does not depend on the values).

Run (about 40 minutes on the shared 2-core CPU, in the background)::

    nice -n 10 python benchmarks/memory.py --layers 8            # writes benchmarks/results/memory.json

Needs ``2 * pair size of 2N`` of free disk under ``--workdir`` (about 15 GB for ``--layers 8``); checked first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
HIDDEN, INTERMEDIATE = 4096, 11008  # a 7B Llama's; --hidden / --intermediate shrink them for a quick check


def layer_matrices(hidden: int, intermediate: int) -> dict[str, tuple[int, int]]:
    return {
        "self_attn.q_proj": (hidden, hidden),
        "self_attn.k_proj": (hidden, hidden),
        "self_attn.v_proj": (hidden, hidden),
        "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }


SHAPES_CHANGED = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")  # one matrix of each distinct shape


# ------------------------------------------------------------------------------------------------ the pair
def write_pair(
    root: Path, layers: int, vocab: int, changed: str, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE
) -> dict:
    """Write ``root/base`` and ``root/ft``; returns what differs and the sizes. Runs in a child process."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    config.architectures = ["LlamaForCausalLM"]
    generator = torch.Generator().manual_seed(0)

    def normal(*shape: int, std: float = 0.02) -> torch.Tensor:
        return torch.empty(shape).normal_(0, std, generator=generator).to(torch.bfloat16)

    # Shards: embeddings, one per decoder layer, then the final norm and the head (the order of a real 7B).
    shards: list[dict[str, tuple[int, ...]]] = [{"model.embed_tokens.weight": (vocab, hidden)}]
    for i in range(layers):
        shard = {f"model.layers.{i}.{n}.weight": s for n, s in layer_matrices(hidden, intermediate).items()}
        shard[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shard[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
        shards.append(shard)
    shards.append({"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)})

    last = layers - 1
    if changed == "all":
        differs = {k for shard in shards for k in shard}
    else:
        differs = {k for shard in shards for k, shape in shard.items() if len(shape) == 1}
        differs |= {f"model.layers.{last}.{name}.weight" for name in SHAPES_CHANGED} | {"lm_head.weight"}
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for side in ("base", "ft"):
        (root / side).mkdir(parents=True, exist_ok=True)
        config.save_pretrained(root / side)
    weight_map, total = {}, 0
    # Random numbers for gigabytes of weights take long on a shared CPU: the decoder layers are one random
    # template scaled by a per-layer factor (so no two layers are equal); embeddings, head and noise are random.
    template = {n: normal(*s) for n, s in layer_matrices(hidden, intermediate).items()}
    for index_, (name, shard) in enumerate(zip(names, shards, strict=True)):
        base = {}
        for key, shape in shard.items():
            if len(shape) == 1:
                base[key] = (1 + 0.1 * normal(*shape, std=1.0).float()).to(torch.bfloat16)
            elif key.startswith("model.layers."):
                base[key] = template[key.split(".", 3)[3].removesuffix(".weight")] * (1 + index_ / 64)
            else:
                base[key] = normal(*shape)
        save_file(base, root / "base" / name, metadata={"format": "pt"})
        if any(k in differs for k in shard):
            ft = {k: (t + normal(*t.shape, std=1e-3)) if k in differs else t for k, t in base.items()}
            save_file(ft, root / "ft" / name, metadata={"format": "pt"})
            del ft
        else:
            shutil.copyfile(root / "base" / name, root / "ft" / name)
        for k, t in base.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        del base
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for side in ("base", "ft"):
        (root / side / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    matrices = sorted(k for k in differs if k in weight_map and len(_shape(shards, k)) == 2)
    return {"model_bytes": total, "changed_matrices": matrices}


def _shape(shards, key):
    return next(shard[key] for shard in shards if key in shard)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------- measuring
def child_compress(base: str, ft: str, out: str, ratio: float | None, device: str | None) -> None:
    """Runs in the measured subprocess: compress, then print one JSON line with the own peak RSS."""
    start = time.perf_counter()
    from impart_peft import ImPartConfig
    from impart_peft.checkpoints import compress_checkpoints

    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    import_s = time.perf_counter() - start
    compress_checkpoints(base, ft, out, ImPartConfig(compression_ratio=ratio), device=device, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    wall = time.perf_counter() - start - import_s
    print(
        json.dumps(
            {"peak_rss_bytes": peak, "import_rss_bytes": imported, "wall_s": wall, "import_s": import_s}
        )
    )


def run_child(args: list[str]) -> tuple[dict, int]:
    """Run this script as a child with ``args``; returns its JSON line and the peak RSS sampled by psutil."""
    import psutil

    process = subprocess.Popen(
        [sys.executable, os.fspath(Path(__file__).resolve()), *args], stdout=subprocess.PIPE, text=True
    )
    sampled = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal sampled
        handle = psutil.Process(process.pid)
        while not done.is_set():
            try:
                sampled = max(sampled, handle.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = process.communicate()
    done.set()
    thread.join()
    if process.returncode != 0:
        raise RuntimeError(f"child {args[:2]} failed with status {process.returncode}")
    return json.loads(out.strip().splitlines()[-1]), sampled


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", type=int, default=8, help="N: pairs with N and 2N decoder layers (default 8)"
    )
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size (default 32000)")
    parser.add_argument(
        "--changed", choices=("shapes", "all"), default="shapes", help="which matrices differ"
    )
    parser.add_argument("--ratio", type=float, default=16.0, help="compression ratio (default 16)")
    parser.add_argument("--device", default=None, help="where the SVDs run (default cpu)")
    parser.add_argument("--hidden", type=int, default=HIDDEN, help=argparse.SUPPRESS)  # quick checks only
    parser.add_argument("--intermediate", type=int, default=INTERMEDIATE, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=HERE / ".cache" / "memory", help="where the pairs go")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "memory.json")
    parser.add_argument("--keep", action="store_true", help="keep the generated pairs")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.child[0] == "write":
            root, layers = Path(args.child[1]), int(args.child[2])
            print(
                json.dumps(write_pair(root, layers, args.vocab, args.changed, args.hidden, args.intermediate))
            )
        else:
            _, base, ft, out = args.child
            child_compress(base, ft, out, args.ratio, args.device)
        return

    shape_args = ["--hidden", str(args.hidden), "--intermediate", str(args.intermediate)]
    layer_bytes = 2 * sum(m * n for m, n in layer_matrices(args.hidden, args.intermediate).values())
    largest_pair = 2 * (2 * args.layers * layer_bytes + 2 * 2 * args.vocab * args.hidden)
    args.workdir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    if free < 1.1 * largest_pair:
        sys.exit(
            f"needs {gib(1.1 * largest_pair)} free under {args.workdir}, has {gib(free)}: lower --layers"
        )

    runs = []
    for layers in (args.layers, 2 * args.layers):
        root = args.workdir / f"llama-{args.hidden}-{layers}"
        shutil.rmtree(root, ignore_errors=True)
        start = time.perf_counter()
        written, _ = run_child([*shape_args, "--vocab", str(args.vocab), "--changed", args.changed,
                                "--child", "write", os.fspath(root), str(layers)])  # fmt: skip
        generate_s = time.perf_counter() - start
        child_args = ["--ratio", str(args.ratio), *(["--device", args.device] if args.device else [])]
        result, sampled = run_child(
            [*child_args, "--child", "compress", os.fspath(root / "base"), os.fspath(root / "ft"),
             os.fspath(root / "adapter")]
        )  # fmt: skip
        run = {
            "layers": layers,
            "model_bytes": written["model_bytes"],
            "pair_bytes": folder_bytes(root / "base") + folder_bytes(root / "ft"),
            "changed_matrices": written["changed_matrices"],
            "adapter_bytes": (root / "adapter" / "adapter_model.safetensors").stat().st_size,
            "peak_rss_bytes": result["peak_rss_bytes"],
            "sampled_peak_rss_bytes": sampled,
            "import_rss_bytes": result["import_rss_bytes"],
            "compress_wall_s": round(result["wall_s"], 1),
            "import_wall_s": round(result["import_s"], 1),
            "generate_wall_s": round(generate_s, 1),
        }
        runs.append(run)
        print(
            f"{layers} layers: pair {gib(run['pair_bytes'])}, peak RSS {gib(run['peak_rss_bytes'])}, "
            f"{run['compress_wall_s']} s",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    small, large = runs
    growth = large["peak_rss_bytes"] / small["peak_rss_bytes"] - 1
    report = {
        "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]),
        "settings": {
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "vocab": args.vocab,
            "dtype": "bfloat16",
            "changed": args.changed,
            "compression_ratio": args.ratio,
            "device": args.device or "cpu",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            "python": platform.python_version(),
        },
        "runs": runs,
        "peak_rss_growth_2N_vs_N": growth,
        "target": {"growth_below": 0.10, "peak_rss_below_bytes": 3 * 2**30},
        "target_met": growth < 0.10 and max(r["peak_rss_bytes"] for r in runs) < 3 * 2**30,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, args.out)

    print()
    print(
        f"{'layers':>6}  {'one model':>10}  {'pair on disk':>12}  {'adapter':>10}  {'peak RSS':>10}  {'compress':>9}"
    )
    for r in runs:
        print(
            f"{r['layers']:>6}  {gib(r['model_bytes']):>10}  {gib(r['pair_bytes']):>12}  "
            f"{r['adapter_bytes'] / 2**20:>7.1f} MiB  {gib(r['peak_rss_bytes']):>10}  {r['compress_wall_s']:>7.0f} s"
        )
    print(f"peak RSS after importing impart_peft: {gib(small['import_rss_bytes'])}")
    print(
        f"2N vs N: {growth:+.1%} (target < +10%, peak < 3 GiB: {'met' if report['target_met'] else 'NOT met'})"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
