"""Writers killed part-way (SIGKILL, in a subprocess) never leave an output that is taken for a finished one.

A child process writes the same output folder over and over, alternating two different adapters (seeds 1 and 2):
``PeftModel.save_pretrained`` and ``compress_checkpoints`` (``impart compress``). The parent kills it with SIGKILL
at a point inside the loop, then loads what is left: the folder must be absent, or load to exactly one of the two
adapters' logits, or be refused with :class:`~impart_peft.validation.InvalidAdapterError` -- on both load paths.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import impart_peft  # noqa: F401  (registers the adapter type)
from impart_peft import ImPartConfig, from_finetuned
from impart_peft.validation import InvalidAdapterError
from tiny_models import make_pair, sample_ids

TESTS = Path(__file__).resolve().parent
WIDTH = 128
CHILD = """
import copy, os, sys
sys.path.insert(0, {tests!r})
import impart_peft
from impart_peft import ImPartConfig, from_finetuned
from tiny_models import make_pair
mode, target, work = sys.argv[1:4]
base, ft = make_pair("llama", width={width})
if mode == "save":
    models = [from_finetuned(copy.deepcopy(base), ft, ImPartConfig(compression_ratio=8, seed=s)) for s in (1, 2)]
i = 0
while True:
    print("writing", i, flush=True)
    if mode == "save":
        models[i % 2].save_pretrained(target)
    else:
        from impart_peft.checkpoints import compress_checkpoints
        compress_checkpoints(
            os.path.join(work, "base"), os.path.join(work, "ft"), target,
            ImPartConfig(compression_ratio=8, seed=1 + i % 2), overwrite=True,
        )
    print("done", i, flush=True)
    i += 1
"""


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    work = tmp_path_factory.mktemp("atomic")
    base, ft = make_pair("llama", width=WIDTH)
    base.save_pretrained(work / "base")
    ft.save_pretrained(work / "ft")
    ids = sample_ids()
    expected = [
        _logits(from_finetuned(copy.deepcopy(base), ft, ImPartConfig(compression_ratio=8, seed=s)), ids)
        for s in (1, 2)
    ]
    return base, ids, expected, work


def _run_and_kill(mode: str, target: Path, work: Path, complete_writes: int, fraction: float) -> None:
    """Start the writer, let it finish ``complete_writes`` writes, then SIGKILL it ``fraction`` of one write later."""
    script = CHILD.format(tests=str(TESTS), width=WIDTH)
    child = subprocess.Popen(
        [sys.executable, "-c", script, mode, str(target), str(work)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        started = None
        durations = []
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                raise AssertionError(f"the {mode} writer ended early (rc {child.poll()})")
            if line.startswith("writing"):
                started = time.monotonic()
            elif line.startswith("done"):
                durations.append(time.monotonic() - started)
                if len(durations) == complete_writes:
                    break
        time.sleep(fraction * (sum(durations) / len(durations)))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.parametrize("mode", ["save", "compress"])
@pytest.mark.parametrize("fraction", [0.35, 0.8])
def test_a_killed_writer_leaves_no_partial_adapter(setup, tmp_path, mode, fraction):
    base, ids, expected, work = setup
    target = tmp_path / "adapter"
    _run_and_kill(mode, target, work, complete_writes=2, fraction=fraction)
    if mode == "compress":
        # impart compress writes a hidden scratch folder and renames it into place: the target is a finished
        # adapter (the previous one) or, killed between the two renames of a replacement, absent.
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "adapter"]
        assert all(name.startswith(".adapter.") for name in leftovers), leftovers
    if not target.exists():
        return
    outcomes = []
    for load in ("peft", "load_adapter"):
        model = copy.deepcopy(base)
        try:
            if load == "peft":
                model = PeftModel.from_pretrained(model, target)
            else:
                model.load_adapter(str(target))
        except InvalidAdapterError:
            outcomes.append("refused")
            continue
        got = _logits(model, ids)
        assert any(torch.equal(got, e) for e in expected), (
            f"{load}: a partial adapter loaded with other logits"
        )
        outcomes.append("loaded")
    assert len(set(outcomes)) == 1, outcomes  # both paths agree
    assert not any(name.endswith(".tmp") for name in os.listdir(target))
