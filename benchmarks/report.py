"""Plots and tables from ``benchmarks/results/{quality,speed}.json``.

Reads ``benchmarks/results/quality_real.json`` (the real pairs; ``quality_toy.json`` if there is no real run).
Writes ``docs/quality_vs_cr.png`` (the headline: task accuracy kept and KL against CR, one line per method, error
bars = std over seeds), ``docs/speed.png`` (time bars), and the generated tables of ``docs/benchmarks.md``: the
text between ``<!-- generated:begin -->`` and ``<!-- generated:end -->`` is replaced, the rest of the page is left
as written. Needs matplotlib (``pip install -e ".[bench]"``).

Run: ``python benchmarks/report.py``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = ROOT / "docs"
BEGIN, END = "<!-- generated:begin -->", "<!-- generated:end -->"

LABELS = {
    "impart": "ImPart (paper rule, beta, C tuned on val)",
    "impart_rescaled": "ImPart, older 'rescaled' rule (tuned on val)",
    "impart_default": "ImPart (default beta 0.8, C 1)",
    "dare": "DARE",
    "lowrank": "LowRank",
    "magnitude": "Magnitude",
    "impart_trim": "ImPart minus pairs with q<0.1 (diagnostic)",
    "impart_qt": "ImPart-QT",
}
COLORS = {
    "impart": "tab:red",
    "impart_rescaled": "tab:pink",
    "impart_default": "tab:orange",
    "dare": "tab:blue",
    "lowrank": "tab:green",
    "magnitude": "tab:gray",
    "impart_trim": "tab:brown",
    "impart_qt": "tab:purple",
}


def _save_fig_atomic(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plot_quality(q: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [*q["tasks"], "mean"]
    ratios = sorted(q["meta"]["ratios"])
    metrics = ("kept", "kl_text", "kl_task")
    fig, axes = plt.subplots(len(metrics), len(tasks), figsize=(4.6 * len(tasks), 10.5), sharex=True)
    for col, task in enumerate(tasks):
        table = q["summary"][task]
        for method, by_ratio in table.items():
            xs = [r for r in ratios if str(r) in by_ratio]
            for row, metric in enumerate(metrics):
                if any(metric not in by_ratio[str(r)] for r in xs):
                    continue
                ys = [by_ratio[str(r)][metric]["mean"] for r in xs]
                es = [by_ratio[str(r)][metric]["std"] for r in xs]
                axes[row, col].errorbar(
                    xs,
                    ys,
                    yerr=es,
                    marker="o",
                    ms=4,
                    capsize=3,
                    color=COLORS.get(method),
                    label=LABELS.get(method, method),
                    ls={"impart_default": "--", "impart_trim": ":", "impart_rescaled": "--"}.get(method, "-"),
                )
        title = "mean over tasks" if task == "mean" else f"task: {task}"
        axes[0, col].set_title(title)
        axes[0, col].axhline(100, color="k", lw=0.6, ls=":")
        axes[0, col].axhline(0, color="k", lw=0.6)
        axes[0, col].set_ylim(-5, 108)
        axes[1, col].set_yscale("log")
        axes[2, col].set_yscale("log")
        axes[2, col].set_xscale("log", base=2)
        axes[2, col].set_xticks(ratios, [str(r) for r in ratios])
        axes[2, col].set_xlabel("compression ratio (CR)")
    axes[0, 0].set_ylabel("accuracy kept, % of the fine-tune's gain")
    axes[1, 0].set_ylabel("KL(fine-tune ‖ compressed), nats/token\n(held-out text, log scale)")
    axes[2, 0].set_ylabel(
        "KL(fine-tune ‖ compressed), nats/token\n(answer positions of the test prompts, log)"
    )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, bbox_to_anchor=(0.5, -0.06))
    suite = q["meta"].get("suite", "toy")
    what = "SmolLM2-135M-Instruct full fine-tunes" if suite == "real" else "toy pairs"
    fig.suptitle(f"Delta compression of {what}: quality vs. size (test split; error bars: std over seeds)")
    _save_fig_atomic(fig, path)
    plt.close(fig)


def plot_speed(s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2))
    rows = s["compression"]
    labels = [f"{r['shape'][0]}x{r['shape'][1]}" for r in rows]
    x = range(len(rows))
    w = 0.38
    a.bar(
        [i - w / 2 for i in x],
        [r["library_ns_per_param"] for r in rows],
        w,
        label="impart_peft.compress_delta",
    )
    a.bar(
        [i + w / 2 for i in x],
        [r["reference_ns_per_param"] for r in rows],
        w,
        label="reference (torch.linalg.svd + torch.bernoulli dense masks)",
    )
    a.set_xticks(list(x), labels)
    a.set_ylabel("ns per delta parameter")
    a.set_title(
        f"compression time per parameter, CR {s['meta']['ratio']}, {s['meta']['threads']} CPU thread(s)"
    )
    a.legend(fontsize=8)
    loads = s["load"]
    names = list(loads)
    keys = [
        ("dense_safetensors_s", "dense fine-tune from safetensors"),
        ("adapter_load_s", "PeftModel.from_pretrained"),
        ("adapter_load_forward_s", "from_pretrained + 1 forward"),
        ("adapter_load_merge_s", "from_pretrained + merge_and_unload"),
    ]
    w = 0.2
    for j, (key, label) in enumerate(keys):
        b.bar([i + (j - 1.5) * w for i in range(len(names))], [loads[n][key] for n in names], w, label=label)
    b.set_xticks(range(len(names)), [f"{n}\n({loads[n]['params'] / 1e6:.1f}M params)" for n in names])
    b.set_yscale("log")
    b.set_ylim(top=20 * max(loads[n][k] for n in names for k, _ in keys))  # room for the legend
    b.set_ylabel("seconds (log)")
    b.set_title("time to get the fine-tune's weights on a loaded base")
    b.legend(fontsize=8)
    _save_fig_atomic(fig, path)
    plt.close(fig)


def _pm(entry: dict, fmt: str) -> str:
    if entry["n"] > 1:
        return f"{entry['mean']:{fmt}} ± {entry['std']:{fmt}}"
    return f"{entry['mean']:{fmt}}"


def _ratio_header(ratios) -> list[str]:
    return ["| method | " + " | ".join(f"CR {r}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]


def quality_tables(q: dict) -> str:
    ratios = sorted(q["meta"]["ratios"])
    tasks = list(q["tasks"])
    out = []
    for metric, title, fmt in (
        ("kept", "Task accuracy kept, % of the fine-tune's gain over the base (test split)", ".1f"),
        ("kl_text", "Next-token KL(fine-tune ‖ compressed), nats/token, on held-out text", ".4f"),
        ("kl_task", "Next-token KL at the answer positions of the test examples, nats/token", ".4f"),
    ):
        out.append(f"#### {title}\n")
        for task in [*tasks, "mean"]:
            label = "mean over tasks" if task == "mean" else f"task `{task}`"
            out.append(f"{label}:\n")
            out.extend(_ratio_header(ratios))
            for method, by_ratio in q["summary"][task].items():
                cells = [
                    _pm(by_ratio[str(r)][metric], fmt)
                    if str(r) in by_ratio and metric in by_ratio[str(r)]
                    else ""
                    for r in ratios
                ]
                out.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
            out.append("")
    out.append("#### The pairs (test split)\n")
    out.append(
        "| task | base acc | fine-tune acc | KL(fine-tune ‖ base), text | lossless ImPart KL | ‖ΔW‖/‖W‖ (all) | "
        "mean over matrices of ‖ΔW‖/‖W‖: q / k / v / o / gate / up / down | mean abs ΔW element | matrices | "
        "values |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for task, info in q["tasks"].items():
        t = info["anchors"]["test"]
        d = info["diagnostics"]
        by_type = d.get("delta_rel_norm_by_type_mean", {})
        types = " / ".join(
            f"{by_type[k]:.4f}"
            for k in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
            if k in by_type
        )
        lossless = (
            f"{info['lossless']['kl_text']:.1e}" if "lossless" in info else "(checked on the first task)"
        )
        out.append(
            f"| {task} | {t['base']:.3f} | {t['finetuned']:.3f} | {t['base_scores']['kl_text']:.4f} | {lossless} | "
            f"{d['delta_rel_norm']:.4f} | {types or 'n/a'} | "
            f"{d.get('mean_abs_delta', float('nan')):.2e} | {info['matrices']} | {info['matrix_values']:,} |"
        )
    out.append("")
    out.append("#### ImPart (beta, C) chosen on the validation split\n")
    for name in dict.fromkeys(n for info in q["tasks"].values() for n in info["selection"]):
        out.append(f"{LABELS.get(name, name)}:\n")
        out.append("| task | " + " | ".join(f"CR {r}" for r in ratios) + " |")
        out.append("|---|" + "---|" * len(ratios))
        for task, info in q["tasks"].items():
            if name not in info["selection"]:
                continue
            cells = []
            for r in ratios:
                sel = info["selection"][name][str(r)]
                at = sel.get("chosen_at_ratio", r)
                if not isinstance(at, (int, float)):  # given on the command line (--fixed-selection)
                    cells.append(f"β {sel['pre_prune_ratio']}, C {sel['importance_exponent']:g} (given)")
                    continue
                where = "" if at == r else f", chosen at CR {at}"
                cells.append(
                    f"β {sel['pre_prune_ratio']}, C {sel['importance_exponent']:g} (val {sel['val_kept']:.0f}%{where})"
                )
            out.append(f"| {task} | " + " | ".join(cells) + " |")
        out.append("")
    out.append(
        "#### Achieved compression ratio (dense values / all stored values, singular values included)\n"
    )
    out.extend(_ratio_header(ratios))
    for method, by_ratio in q["summary"]["mean"].items():
        cells = [
            f"{by_ratio[str(r)]['achieved_ratio']['mean']:.2f}" if str(r) in by_ratio else "" for r in ratios
        ]
        out.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("#### The paper's ordering, checked\n")
    out.append(
        "| where | claim | kept % (ImPart vs other) | holds on kept | KL text (ImPart vs other) | holds on KL |"
    )
    out.append("|---|---|---|---|---|---|")
    for c in q["ordering"]:
        out.append(
            f"| {c['task']} | {c['claim']} | {c['kept'][0]:.1f} vs {c['kept'][1]:.1f} | "
            f"{'yes' if c['holds_kept'] else '**no**'} | {c['kl_text'][0]:.4f} vs {c['kl_text'][1]:.4f} | "
            f"{'yes' if c['holds_kl'] else '**no**'} |"
        )
    out.append("")
    out.append("#### Diagnostics: the spectra, and each method's expected squared error (closed forms)\n")
    out.append(
        "Expected `E‖ΔW_c − ΔW‖²` summed over the matrices, relative to `‖ΔW‖²` (DARE: `CR − 1`; LowRank: the "
        "dropped energy; ImPart: `Σ σ_k² (1/(q_U,k q_V,k) − 1)` over kept pairs + the dropped energy), the smallest "
        "keep fraction ImPart gives a kept pair, and the share of its kept pairs below 0.1. Judge quality on the "
        "tables above, not on these: they explain, they do not rank.\n"
    )
    for task, info in q["tasks"].items():
        d = info["diagnostics"]
        top = d["energy_top"]
        shares = " / ".join(f"{top[k]:.2f}" for k in ("0.01", "0.05", "0.1", "0.2", "0.5") if k in top)
        out.append(
            f"`{task}`: ‖ΔW‖/‖W_base‖ = {d['delta_rel_norm']:.4f}; share of ‖ΔW‖² in the top 1% / 5% / 10% / 20% / "
            f"50% of each matrix's singular pairs: {shares}.\n"
        )
        out.append("| | " + " | ".join(f"CR {r}" for r in ratios) + " |")
        out.append("|---|" + "---|" * len(ratios))
        for key in d["relative_error"][str(ratios[0])]:
            cells = [f"{d['relative_error'][str(r)][key]:.3g}" for r in ratios]
            out.append(f"| rel. error {key} | " + " | ".join(cells) + " |")
        for key in d["impart_min_keep_prob"]:
            if key.endswith(("b0.8_C1", "b0.6_C0.5")):
                cells = [
                    f"{d['impart_min_keep_prob'][key][str(r)]:.4f} / "
                    f"{100 * d['impart_pairs_below_0.1'][key][str(r)]:.0f}%"
                    for r in ratios
                ]
                out.append(f"| {key}: min keep fraction / kept pairs below 0.1 | " + " | ".join(cells) + " |")
        out.append("")
    unavailable = {k: v["unavailable"] for k, v in q["meta"]["methods"].items() if v["unavailable"]}
    if unavailable:
        out.append("Not run: " + "; ".join(f"`{k}`: {v}" for k, v in unavailable.items()) + ".\n")
    merging = q.get("merging", {})
    if merging.get("status") != "run":
        out.append(f"Merging (TA / TIES with DARE vs ImPart): not run: {merging.get('reason')}.\n")
    else:
        mtasks = merging.get("tasks", tasks)
        out.append(
            "#### Merging the fine-tunes into one model (test split, % of each fine-tune's gain kept)\n"
        )
        density = merging["rows"][0].get("density")
        out.append(
            f"`impart_peft.merge_finetunes(base, [{', '.join(mtasks)}], method, sparsify, density={density}, "
            "seed)`, weights 1, scaling 1: each task vector sparsified to CR "
            f"{1 / density:g} (ImPart at β 0.8, C 1; DARE) before the merge; `None` merges the dense task vectors.\n"
        )
        out.append(
            "| merge | sparsify | seed | " + " | ".join(f"{t} kept %" for t in mtasks) + " | mean kept % |"
        )
        out.append("|---|---|---|" + "---|" * (len(mtasks) + 1))
        for r in merging["rows"]:
            mean = sum(r[f"{t}_kept"] for t in mtasks) / len(mtasks)
            out.append(
                f"| {r['method']} | {r['sparsify']} | {r['seed']} | "
                + " | ".join(f"{r[f'{t}_kept']:.1f}" for t in mtasks)
                + f" | {mean:.1f} |"
            )
        out.append("")
    meta = q["meta"]
    partial = "" if meta.get("complete", True) else " **Partial run**: not every task finished."
    cut = [t for t, info in q["tasks"].items() if info.get("partial")]
    if cut:
        partial += f" Cut short (the ratios it reached are in the tables): {', '.join(cut)}."
    out.append(
        f"Quality run: {meta['elapsed_s'] / 60:.1f} min"
        + (" (summed over the processes that measured it)" if meta.get("resumed_s") else "")
        + f", {meta['threads']} thread(s), torch {meta['torch']}, "
        f"test seeds {meta['seeds']}, command `{meta.get('command', 'python benchmarks/quality.py')}`.{partial}\n"
    )
    return "\n".join(out)


def speed_tables(s: dict) -> str:
    out = ["#### Compression time per delta parameter (CPU)\n"]
    out.append(
        "| shape | library s | reference s | library ns/param | reference ns/param | reference / library "
        "| library SVD s | allocation s | masks + pack s | reference mask bits stored |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in s["compression"]:
        out.append(
            f"| {r['shape'][0]}x{r['shape'][1]} | {r['library_s']:.3f} | {r['reference_s']:.3f} | "
            f"{r['library_ns_per_param']:.1f} | {r['reference_ns_per_param']:.1f} | {r['reference_over_library']:.2f} | "
            f"{r.get('library_svd_s', float('nan')):.3f} | {r.get('library_allocation_s', float('nan')):.4f} | "
            f"{r.get('library_masks_pack_s', float('nan')):.4f} | {r['reference_mask_bits']:,} |"
        )
    out.append("")
    out.append("#### Getting the fine-tune's weights onto a loaded base (CPU)\n")
    out.append(
        "| pair | params | dense file | adapter file | dense safetensors load s | from_pretrained s "
        "| + forward s | + merge_and_unload s | merge / dense | compress (from_finetuned) s |"
    )
    out.append("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in s["load"].items():
        out.append(
            f"| {name} | {r['params'] / 1e6:.2f}M | {r['dense_file_bytes'] / 1e6:.2f} MB | "
            f"{r['adapter_file_bytes'] / 1e6:.2f} MB | {r['dense_safetensors_s']:.3f} | {r['adapter_load_s']:.3f} | "
            f"{r['adapter_load_forward_s']:.3f} | {r['adapter_load_merge_s']:.3f} | {r['merge_over_dense']:.1f}x | "
            f"{r['compress_s']:.1f} |"
        )
    out.append("")
    gpu = s["meta"]["gpu"]
    out.append(
        f"GPU: {gpu if gpu else 'none (no GPU was lent to the session that ran this; rerun with --device cuda on one)'}. "
        f"Speed run: {s['meta']['elapsed_s'] / 60:.1f} min, {s['meta']['threads']} thread(s).\n"
    )
    return "\n".join(out)


def write_doc(generated: str, path: Path) -> None:
    text = path.read_text() if path.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} lacks the {BEGIN} / {END} markers that delimit the generated tables")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n\n{generated}\n{END}{tail}"
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.replace(tmp, path)


def main() -> None:
    DOCS.mkdir(exist_ok=True)
    parts = []
    q_path, s_path = RESULTS / "quality_real.json", RESULTS / "speed.json"
    if not q_path.exists():
        q_path = RESULTS / "quality_toy.json"
    if q_path.exists():
        q = json.loads(q_path.read_text())
        plot_quality(q, DOCS / "quality_vs_cr.png")
        parts.append("### Quality\n\n![quality vs CR](quality_vs_cr.png)\n\n" + quality_tables(q))
    if s_path.exists():
        s = json.loads(s_path.read_text())
        plot_speed(s, DOCS / "speed.png")
        parts.append("### Speed\n\n![speed](speed.png)\n\n" + speed_tables(s))
    if not parts:
        sys.exit("no results: run benchmarks/run_all.sh first")
    write_doc("\n".join(parts), DOCS / "benchmarks.md")
    print(f"wrote {DOCS / 'benchmarks.md'} and the plots", file=sys.stderr)


if __name__ == "__main__":
    main()
