"""The package's structure (docs/architecture.md): the layers and their import rule, no import cycle, the pure
math importable without PEFT or transformers, registration with PEFT when PEFT is imported, and the adapter bytes
of the two ways of compressing pinned to each other."""

from __future__ import annotations

import ast
import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from impart_peft import ImPartConfig, from_finetuned
from impart_peft.checkpoints import compress_checkpoints
from impart_peft.filenames import ADAPTER_WEIGHTS
from tiny_models import make_pair

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "impart_peft"

# The layers, lowest first (docs/architecture.md). An import goes to the same layer or a lower one.
LAYERS = {
    # math and formats: torch and the standard library only, never PEFT or transformers
    "math": {
        "_version",
        "adapter_io",
        "allocation",
        "baselines",
        "budget",
        "delta",
        "filenames",
        "fingerprint",
        "masks",
        "quantization",
        "safetensors_io",
    },
    # the PEFT tuner: the adapter type and what builds it in memory
    "tuner": {"registration", "config", "layer", "model", "compressor", "merging", "planning", "validation"},
    # checkpoints on disk, the Hub, the command line, the package's own glue
    "edge": {
        "__init__",
        "_autoload",
        "checkpoint_apply",
        "checkpoint_compress",
        "checkpoint_io",
        "checkpoints",
        "cli",
        "evaluation",
        "hub",
        "inspection",
        "modelcard",
        "smollm2",
    },
}
# Imports inside a function that reach a higher layer, each for a reason (docs/architecture.md).
UPWARD_EXCEPTIONS = {
    ("merging", "checkpoint_io"),  # merge_finetunes on folders streams them as `impart apply` does
}
HEAVY = ("peft", "transformers", "accelerate", "huggingface_hub", "safetensors")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import of impart_peft modules and of the heavy libraries."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                names = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif node.level == 0 and node.module:
                parts = node.module.split(".")
                if parts[0] == "impart_peft":
                    names = [parts[1] if len(parts) > 1 else "__init__"]
                elif parts[0] in HEAVY:
                    names = [parts[0]]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "impart_peft":
                    names.append(parts[1] if len(parts) > 1 else "__init__")
                elif parts[0] in HEAVY:
                    names.append(parts[0])
        found += [(name, id(node) in top_level) for name in names]
    return found


def _graph() -> dict[str, list[tuple[str, bool]]]:
    return {path.stem: _imports(path) for path in sorted(PACKAGE.glob("*.py"))}


def test_every_module_has_a_layer():
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    placed = set().union(*LAYERS.values())
    assert modules == placed, f"unplaced: {sorted(modules - placed)}, gone: {sorted(placed - modules)}"


def test_imports_run_down_the_layers():
    rank = {module: i for i, members in enumerate(LAYERS.values()) for module in members}
    wrong = []
    for module, imports in _graph().items():
        for target, top_level in imports:
            if target in HEAVY:
                if module in LAYERS["math"]:
                    wrong.append(f"{module} imports {target}")
                continue
            if rank[target] > rank[module] and (top_level or (module, target) not in UPWARD_EXCEPTIONS):
                wrong.append(
                    f"{module} ({'module level' if top_level else 'in a function'}) imports {target}"
                )
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_import_graph_has_no_cycle():
    graph = {
        m: sorted({t for t, _ in imports if t not in HEAVY and t != m}) for m, imports in _graph().items()
    }
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in graph[module]:
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle (function-level imports included): " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module)


def _run(code: str) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE.parent), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.mark.parametrize(
    "statement",
    [
        "import impart_peft",
        "import impart_peft.delta",
        "import impart_peft.allocation, impart_peft.masks, impart_peft.baselines, impart_peft.quantization",
        "from impart_peft import compress_delta, dare_delta, allocate_keep_prob",
        "from impart_peft.cli import build_parser; build_parser().format_help()",
    ],
)
def test_the_math_imports_without_peft_or_transformers(statement):
    out = _run(f"import sys\n{statement}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert out.strip() == "[]", f"{statement!r} imported {out.strip()}"


def test_importing_peft_after_impart_peft_registers_once():
    out = _run(
        "import impart_peft, sys\n"
        "from impart_peft import _autoload\n"
        "assert 'peft' not in sys.modules\n"
        "from peft import PeftConfig, PeftModel, PeftType\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "from impart_peft import ImPartConfig\n"
        "assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.IMPART] is ImPartConfig\n"
        "assert hasattr(PeftModel.save_pretrained, '__impart_wrapped__')\n"
        "import impart_peft.config, impart_peft.model\n"
        "assert _autoload._finder not in sys.meta_path\n"
        "print(sorted(_autoload.activations))\n"
    )
    assert out.strip() == "['peft', 'transformers.modeling_utils']"


@pytest.mark.parametrize(
    "first", ["import peft", "import impart_peft.config", "from impart_peft import ImPartModel"]
)
def test_registration_whatever_imports_peft_first(first):
    out = _run(
        f"{first}\n"
        "import impart_peft\n"
        "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
        "from impart_peft import IMPART_PEFT_TYPE, ImPartConfig, _autoload\n"
        "assert PEFT_TYPE_TO_CONFIG_MAPPING[IMPART_PEFT_TYPE] is ImPartConfig\n"
        "print(_autoload.activations.count('peft'))\n"
    )
    assert out.strip() == "1"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base, finetuned = make_pair("llama", steps=3)
    root = tmp_path_factory.mktemp("architecture")
    base.save_pretrained(root / "base")
    finetuned.save_pretrained(root / "ft")
    return base, finetuned, root


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "settings",
    [{"compression_ratio": 4.0}, {"compression_ratio": 8.0, "quantization": {"bits": [8, 4]}}],
    ids=["impart", "impart-qt"],
)
def test_both_ways_of_compressing_write_the_same_bytes(folders, settings, tmp_path):
    base, finetuned, root = folders
    config = ImPartConfig(seed=5, **settings)
    from_finetuned(copy.deepcopy(base), finetuned, config).save_pretrained(tmp_path / "in_memory")
    compress_checkpoints(root / "base", root / "ft", tmp_path / "streamed", config, progress=False)
    assert _sha256(tmp_path / "in_memory" / ADAPTER_WEIGHTS) == _sha256(
        tmp_path / "streamed" / ADAPTER_WEIGHTS
    )


def test_load_adapter_reads_impart_after_import_impart_peft_alone(folders, tmp_path):
    base, finetuned, root = folders
    model = from_finetuned(copy.deepcopy(base), finetuned, ImPartConfig(compression_ratio=4.0))
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        expected = model(input_ids=torch.arange(3, 11)[None]).logits
    torch.save(expected, tmp_path / "expected.pt")
    out = _run(
        "import sys, torch, impart_peft\n"
        "from transformers import AutoModelForCausalLM\n"
        f"model = AutoModelForCausalLM.from_pretrained({os.fspath(root / 'base')!r})\n"
        "assert 'peft' not in sys.modules\n"
        f"model.load_adapter({os.fspath(tmp_path / 'adapter')!r})\n"
        "with torch.no_grad():\n"
        "    logits = model(input_ids=torch.arange(3, 11)[None]).logits\n"
        f"expected = torch.load({os.fspath(tmp_path / 'expected.pt')!r})\n"
        "print(torch.allclose(logits, expected, atol=1e-5))\n"
    )
    assert out.strip().splitlines()[-1] == "True"
