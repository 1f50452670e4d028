"""The ``impart`` command line, in-process (``main([...])``) and once through the installed console script."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from impart_peft import ImPartConfig
from impart_peft.cli import build_parser, main
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
