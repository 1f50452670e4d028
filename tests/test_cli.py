"""The ``impart`` command line, in-process (``main([...])``) and once through the installed console script."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from impart_peft import ImPartConfig
from impart_peft.budget import parse_target_size
from impart_peft.cli import build_parser, main
from impart_peft.modelcard import build_model_card
from test_checkpoints import load, reference_adapter, sample_ids, save_pair, tiny_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    base_dir, ft_dir = save_pair(root, "llama", tie=False, dtype=torch.bfloat16)
    return root, base_dir, ft_dir


@pytest.fixture(scope="module")
def reference(pair):
    """The adapter from_finetuned + save_pretrained write with ImPartConfig's defaults."""
    root, base_dir, ft_dir = pair
    reference_adapter(base_dir, ft_dir, ImPartConfig(), root / "reference-defaults")
    return root / "reference-defaults"


def weights(folder: Path) -> bytes:
    return (folder / "adapter_model.safetensors").read_bytes()


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def console_script() -> str:
    script = Path(sys.executable).parent / "impart"
    found = os.fspath(script) if script.is_file() else shutil.which("impart")
    if found is None:
        pytest.skip("the impart console script is not installed")
    return found


def test_compress_defaults_match_from_finetuned(pair, reference, tmp_path, capsys):
    _, base_dir, ft_dir = pair
    assert (
        main(["compress", os.fspath(base_dir), os.fspath(ft_dir), os.fspath(tmp_path / "a"), "--quiet"]) == 0
    )
    assert weights(tmp_path / "a") == weights(reference)
    assert capsys.readouterr().out == ""  # --quiet: no summary either


def test_compress_with_the_rescaled_allocation_matches_from_finetuned(pair, tmp_path, capsys):
    _, base_dir, ft_dir = pair
    config = ImPartConfig(compression_ratio=8.0, allocation="rescaled")
    reference_adapter(base_dir, ft_dir, config, tmp_path / "reference")
    out = tmp_path / "rescaled"
    argv = ["compress", os.fspath(base_dir), os.fspath(ft_dir), os.fspath(out), "--ratio", "8"]
    assert main([*argv, "--allocation", "rescaled", "--quiet"]) == 0
    assert weights(out) == weights(tmp_path / "reference")
    assert json.loads((out / "adapter_config.json").read_text())["allocation"] == "rescaled"
    assert main(["inspect", os.fspath(out)]) == 0
    assert "allocation rescaled" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*argv, "--allocation", "dare"])


def test_console_script_matches_from_finetuned(pair, tmp_path):
    root, base_dir, ft_dir = pair
    config = ImPartConfig(compression_ratio=4.0, pre_prune_ratio=0.5, importance_exponent=0.5, seed=3)
    reference_adapter(base_dir, ft_dir, config, tmp_path / "reference")
    out = tmp_path / "shell"
    flags = ["--ratio", "4", "--pre-prune", "0.5", "--exponent", "0.5", "--seed", "3"]
    result = subprocess.run(
        [console_script(), "compress", os.fspath(base_dir), os.fspath(ft_dir), os.fspath(out), *flags],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert weights(out) == weights(tmp_path / "reference")
    assert f"wrote {out}" in result.stdout
    assert "compress: 100%" in result.stderr  # the progress bar, with its tensor count
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (
        saved["compression_ratio"],
        saved["pre_prune_ratio"],
        saved["importance_exponent"],
        saved["seed"],
    ) == (
        4.0,
        0.5,
        0.5,
        3,
    )


def test_parser_defaults_are_the_config_defaults():
    args = build_parser().parse_args(["compress", "base", "ft", "out"])
    defaults = ImPartConfig()
    assert args.ratio == defaults.compression_ratio
    assert args.pre_prune == defaults.pre_prune_ratio
    assert args.exponent == defaults.importance_exponent
    assert args.seed == defaults.seed
    assert args.svd_dtype == defaults.svd_dtype
    assert args.allocation == defaults.allocation == "paper"
    assert (not args.no_embeddings) == defaults.include_embeddings
    fields = {f.name for f in dataclasses.fields(ImPartConfig)}
    assert {"compression_ratio", "pre_prune_ratio", "importance_exponent", "seed"} <= fields
    assert build_parser().parse_args(["compress", "b", "f", "o", "--ratio", "none"]).ratio is None


@pytest.mark.parametrize("command", ["compress", "inspect", "apply", "eval"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: impart {command}")
    if command == "compress":
        assert f"(default: {ImPartConfig().compression_ratio})" in " ".join(out.split())


def test_missing_folder_is_one_line(pair, tmp_path, capsys):
    _, _, ft_dir = pair
    missing = tmp_path / "no-such-base"
    code = main(["compress", os.fspath(missing), os.fspath(ft_dir), os.fspath(tmp_path / "out")])
    assert code == 1
    assert (
        error_line(capsys) == f"impart compress: error: the base folder {os.fspath(missing)!r} does not exist"
    )
    assert not (tmp_path / "out").exists()


def test_mismatched_pair_is_one_line(pair, tmp_path, capsys):
    _, base_dir, _ = pair
    tiny_model("gpt2", False).save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()  # only what the command prints counts
    code = main(["compress", os.fspath(base_dir), os.fspath(tmp_path / "gpt2"), os.fspath(tmp_path / "out")])
    assert code == 1
    line = error_line(capsys)
    assert line.startswith(
        "impart compress: error: the base is a 'llama' model and the fine-tune a 'gpt2' model"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("ratio", ["0.5", "1", "abc"])
def test_bad_ratio_is_a_usage_error(ratio, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "base", "ft", "out", "--ratio", ratio])
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert line.startswith("impart compress: error: argument --ratio:")
    assert "> 1" in line or "not a number" in line


def test_debug_shows_the_traceback(pair, tmp_path):
    _, _, ft_dir = pair
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(
            [
                "--debug",
                "compress",
                os.fspath(tmp_path / "nope"),
                os.fspath(ft_dir),
                os.fspath(tmp_path / "o"),
            ]
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(
            [
                "compress",
                os.fspath(tmp_path / "nope"),
                os.fspath(ft_dir),
                os.fspath(tmp_path / "o"),
                "--debug",
            ]
        )


def test_bad_push_repo_id_is_refused_before_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "base", "ft", "out", "--push-to-hub", "not a repo"])
    assert exit_info.value.code == 2
    assert "argument --push-to-hub" in error_line(capsys)


def test_inspect_table_and_json(reference, capsys):
    assert main(["inspect", os.fspath(reference)]) == 0
    out = capsys.readouterr().out
    config = json.loads((reference / "adapter_config.json").read_text())
    for name in config["module_meta"]:
        assert f"\n{name} " in out
    assert f"total ({len(config['module_meta'])} modules)" in out
    assert main(["inspect", os.fspath(reference), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in data["modules"]] == list(config["module_meta"])
    assert data["file_bytes"] == (reference / "adapter_model.safetensors").stat().st_size
    up = next(m for m in data["modules"] if m["name"] == "model.layers.0.mlp.up_proj")
    meta = config["module_meta"]["model.layers.0.mlp.up_proj"]
    assert up["factor_values"] == meta["u_count"] + meta["v_count"]
    assert up["nominal_ratio"] == pytest.approx(64 * 32 / (meta["u_count"] + meta["v_count"]))


def test_apply_and_eval(pair, reference, tmp_path, capsys):
    _, base_dir, ft_dir = pair
    out = tmp_path / "merged"
    assert main(["apply", os.fspath(base_dir), os.fspath(reference), os.fspath(out), "--quiet"]) == 0
    applied = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    merged = PeftModel.from_pretrained(load(base_dir), reference).merge_and_unload().eval()
    with torch.no_grad():
        assert torch.equal(applied(sample_ids()).logits, merged(sample_ids()).logits)

    text = tmp_path / "text.txt"
    text.write_text("Some text to read. " * 10)
    capsys.readouterr()
    args = ["eval", os.fspath(base_dir), os.fspath(ft_dir), os.fspath(reference), "--text", os.fspath(text)]
    assert main([*args, "--json", "--quiet", "--max-tokens", "40"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 40
    assert result["kl_adapter"] >= 0 and result["kl_base"] > 0
    assert main([*args, "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "base + adapter" in table and "perplexity" in table

    assert main(["eval", *args[1:4], "--text", os.fspath(tmp_path / "missing.txt")]) == 1
    assert "the text file" in error_line(capsys)


# ---------------------------------------------------------------------------------- --size, --size-rule, auto
def compress_argv(pair, out: Path, *flags: str) -> list[str]:
    _, base_dir, ft_dir = pair
    return ["compress", os.fspath(base_dir), os.fspath(ft_dir), os.fspath(out), *flags]


def achieved_ratio(config: dict) -> float:
    """Dense values of the compressed matrices / their stored factor values, from module_meta."""
    matrices = [m for m in config["module_meta"].values() if m.get("rank")]
    dense = sum(m["shape"][0] * m["shape"][1] for m in matrices)
    return dense / sum(m["u_count"] + m["v_count"] for m in matrices)


def too_small_line(pair, out: Path, size: str, capsys, *flags: str) -> tuple[str, int]:
    """The one error line of a too-small --size, and the smallest size (bytes) it names."""
    capsys.readouterr()
    assert main([*compress_argv(pair, out, "--size", size, *flags), "--quiet"]) == 1
    line = error_line(capsys)
    assert line.startswith(f"impart compress: error: --size {size} is too small for this fine-tune")
    found = re.search(r"ask for --size ([0-9]+) or more", line)
    assert found, line
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # no hidden partial folder either
    return line, int(found.group(1))


def test_help_shows_size_and_auto(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--size SIZE" in out and "30MB" in out and "16x" in out
    assert "--size-rule {uniform,spectral}" in out
    assert "--pre-prune BETA|auto" in out and "--exponent C|auto" in out
    args = build_parser().parse_args(["compress", "b", "f", "o"])
    assert args.size is None and args.size_rule is None  # ImPartConfig's: no target_size, size_rule "uniform"
    args = build_parser().parse_args(["compress", "b", "f", "o", "--pre-prune", "AUTO", "--exponent", "auto"])
    assert (args.pre_prune, args.exponent) == ("auto", "auto")


@pytest.mark.parametrize(("size", "rule"), [("13kB", None), ("13.5KiB", "spectral"), ("20000", "uniform")])
def test_size_caps_the_file_and_matches_from_finetuned(pair, size, rule, tmp_path, capsys):
    _, base_dir, ft_dir = pair
    cap = parse_target_size(size).nbytes
    out = tmp_path / "sized"
    flags = ["--size", size] + (["--size-rule", rule] if rule else [])
    assert main(compress_argv(pair, out, *flags)) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    file_bytes = (out / "adapter_model.safetensors").stat().st_size
    assert file_bytes <= cap
    # The budget is spent, not just respected: a --size ignored would give the default ratio 16's 12.4 kB.
    assert file_bytes > 0.9 * cap
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["target_size"] == size and saved["size_rule"] == (rule or "uniform")
    assert saved["compression_ratio"] == pytest.approx(achieved_ratio(saved))
    # The same adapter as the library makes from ImPartConfig(target_size=..., size_rule=...).
    config = ImPartConfig(target_size=size, size_rule=rule or "uniform")
    reference_adapter(base_dir, ft_dir, config, tmp_path / "reference")
    assert weights(out) == weights(tmp_path / "reference")
    card = (out / "README.md").read_text()
    assert f"| Size budget (target_size; size rule) | {size} ({rule or 'uniform'}) |" in card


def test_size_as_a_global_ratio(pair, tmp_path, capsys):
    out = tmp_path / "x4"
    assert main([*compress_argv(pair, out, "--size", "4x"), "--quiet"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["target_size"] == "4x"
    dense = sum(
        m["shape"][0] * m["shape"][1] * 2  # bf16
        for m in saved["module_meta"].values()
        if m.get("rank")
    )
    assert (out / "adapter_model.safetensors").stat().st_size <= dense // 4
    assert main(["inspect", os.fspath(out)]) == 0
    assert "settings:   target size 4x (size rule uniform), achieved ratio " in capsys.readouterr().out


def test_auto_settings_are_recorded_and_inspected(pair, tmp_path, capsys):
    out = tmp_path / "auto"
    assert (
        main(
            [
                *compress_argv(pair, out, "--pre-prune", "auto", "--exponent", "auto", "--ratio", "8"),
                "--quiet",
            ]
        )
        == 0
    )
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["pre_prune_ratio"], saved["importance_exponent"], saved["compression_ratio"]) == (
        "auto",
        "auto",
        8.0,
    )
    recorded = {n: m for n, m in saved["module_meta"].items() if "pre_prune_ratio" in m}
    matrices = {n for n, m in saved["module_meta"].items() if m.get("rank")}
    assert set(recorded) == matrices and matrices
    assert {m["pre_prune_ratio"] for m in recorded.values()} <= {0.6, 0.7, 0.8}
    assert {m["importance_exponent"] for m in recorded.values()} <= {0.5, 1.0}

    assert main(["inspect", os.fspath(out)]) == 0
    text = capsys.readouterr().out
    assert "pre-prune auto, exponent auto" in text
    header = next(line for line in text.splitlines() if line.startswith("module "))
    assert header.split()[-3:] == ["ratio", "beta", "C"]
    for name, meta in recorded.items():
        row = next(line for line in text.splitlines() if line.startswith(f"{name} "))
        assert row.split()[-3:] == [
            f"{meta['compression_ratio']:.2f}",
            f"{meta['pre_prune_ratio']:g}",
            f"{meta['importance_exponent']:g}",
        ]
    vector = next(n for n, m in saved["module_meta"].items() if m["kind"] == "vector")
    assert next(line for line in text.splitlines() if line.startswith(f"{vector} ")).split()[-3:] == ["-"] * 3
    assert f"per-matrix ratio min/median/max: 8.00 / 8.00 / 8.00 over {len(recorded)} matrices" in text

    assert main(["inspect", os.fspath(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["pre_prune_ratio"], data["importance_exponent"], data["target_size"]) == (
        "auto",
        "auto",
        None,
    )
    for module in data["modules"]:
        meta = saved["module_meta"][module["name"]]
        if module["name"] in recorded:
            assert module["settings"] == {
                k: meta[k] for k in ("compression_ratio", "pre_prune_ratio", "importance_exponent")
            }
        else:
            assert module["settings"] is None
    assert data["per_matrix"]["matrices"] == len(recorded)
    betas = [m["pre_prune_ratio"] for m in recorded.values()]
    assert sum(data["per_matrix"]["pre_prune_ratio_counts"].values()) == len(betas)
    card = (out / "README.md").read_text()
    assert "| Pre-prune ratio (beta) | auto, chosen per matrix from its spectrum: " in card


def test_spectral_size_records_spread_ratios(pair, tmp_path, capsys):
    out = tmp_path / "spectral"
    argv = compress_argv(pair, out, "--size", "14kB", "--size-rule", "spectral", "--pre-prune", "auto")
    assert main([*argv, "--quiet"]) == 0
    saved = json.loads((out / "adapter_config.json").read_text())
    ratios = sorted(m["compression_ratio"] for m in saved["module_meta"].values() if m.get("rank"))
    assert main(["inspect", os.fspath(out), "--json"]) == 0
    per_matrix = json.loads(capsys.readouterr().out)["per_matrix"]
    assert (per_matrix["ratio_min"], per_matrix["ratio_max"]) == (ratios[0], ratios[-1])
    assert per_matrix["ratio_median"] == pytest.approx(statistics.median(ratios))
    assert main(["inspect", os.fspath(out)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("per-matrix ratio"))
    assert line.startswith(
        f"per-matrix ratio min/median/max: {ratios[0]:.2f} / {statistics.median(ratios):.2f} / {ratios[-1]:.2f}"
    )
    # The card's table, and its Python snippet (when no command is known) reproduces the config: valid Python.
    card = build_model_card(
        saved, adapter_bytes=(out / "adapter_model.safetensors").stat().st_size, versions={}
    )
    median = statistics.median(ratios)
    assert (
        f"| Compression ratio per matrix, min / median / max | {ratios[0]:.2f} / {median:.2f} / {ratios[-1]:.2f} |"
        in card
    )
    snippet = re.search(r"^config = (ImPartConfig\(.*\))$", card, re.MULTILINE).group(1)
    again = eval(snippet, {"ImPartConfig": ImPartConfig})  # noqa: S307 (the card this test just made)
    assert (again.target_size, again.size_rule, again.pre_prune_ratio, again.importance_exponent) == (
        "14kB",
        "spectral",
        "auto",
        1.0,
    )


def test_default_adapter_has_no_per_matrix_columns(reference, capsys):
    assert main(["inspect", os.fspath(reference)]) == 0
    text = capsys.readouterr().out
    assert "per-matrix" not in text and " beta " not in text
    assert "settings:   ratio 16, pre-prune 0.8, exponent 1," in text
    assert main(["inspect", os.fspath(reference), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["per_matrix"] is None and data["target_size"] is None
    assert all(m["settings"] is None for m in data["modules"])


@pytest.mark.parametrize("size", ["30QB", "abc", "1x", "0MB", "-5"])
def test_bad_size_is_a_usage_error(size, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "base", "ft", "out", "--size", size])
    assert exit_info.value.code == 2
    line = error_line(capsys)
    with pytest.raises(ValueError) as expected:
        parse_target_size(size)
    assert line == f"impart compress: error: argument --size: {expected.value} (see 'impart compress --help')"


def test_size_with_ratio_or_rule_alone_is_refused(pair, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "base", "ft", "out", "--size", "30MB", "--ratio", "8"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in error_line(capsys)
    with pytest.raises(SystemExit) as exit_info:
        main(["merge", "base", "ft", "out", "--pre-prune", "auto"])  # merging has no plan: numbers only
    assert exit_info.value.code == 2
    assert "argument --pre-prune" in error_line(capsys)
    out = tmp_path / "rule"
    assert main([*compress_argv(pair, out, "--size-rule", "spectral")]) == 1
    assert "--size-rule" in error_line(capsys) and not out.exists()
    assert main([*compress_argv(pair, out, "--size", "30MB", "--bits", "8,4")]) == 1
    assert "quantization" in error_line(capsys) and not out.exists()


@pytest.mark.parametrize("rule", ["uniform", "spectral"])
def test_too_small_size_names_the_smallest_that_works(pair, rule, tmp_path, capsys):
    out = tmp_path / "small"
    line, smallest = too_small_line(pair, out, "1kB", capsys, "--size-rule", rule)
    assert smallest > 1000 and f"is {smallest} bytes" in line
    # The size named works, and one byte less does not (it names the same smallest size again).
    assert main([*compress_argv(pair, out, "--size", str(smallest), "--size-rule", rule), "--quiet"]) == 0
    assert (out / "adapter_model.safetensors").stat().st_size <= smallest
    _, again = too_small_line(pair, tmp_path / "smaller", str(smallest - 1), capsys, "--size-rule", rule)
    assert again == smallest
