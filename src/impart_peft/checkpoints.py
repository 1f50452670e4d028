"""Compress and apply ImPart adapters straight from (sharded) safetensors checkpoints, in bounded memory: the public
names of the checkpoint tools, in one place. Each idea lives in its own module:

* :mod:`impart_peft.checkpoint_io`: finding, reading and atomically writing checkpoint and adapter folders
  (:class:`Checkpoint`, :func:`resolve_folder`, ``write_sharded_checkpoint``), over
  :mod:`impart_peft.safetensors_io` (the format, streamed: :func:`write_safetensors`);
* :mod:`impart_peft.checkpoint_compress`: :func:`compress_checkpoints` (``impart compress``);
* :mod:`impart_peft.checkpoint_apply`: :func:`apply_adapter` (``impart apply``);
* :mod:`impart_peft.inspection`: :func:`inspect_adapter` (``impart inspect``);
* :mod:`impart_peft.evaluation`: :func:`evaluate_adapter` (``impart eval``).

Every folder is written atomically: into a hidden temporary folder beside the output, renamed into place only when
complete, so an interrupted run leaves nothing that looks like a finished adapter or model.
"""

from __future__ import annotations

from .checkpoint_apply import apply_adapter
from .checkpoint_compress import compress_checkpoints
from .checkpoint_io import Checkpoint, resolve_folder
from .evaluation import DEFAULT_EVAL_TEXT, EvalResult, evaluate_adapter
from .filenames import ADAPTER_PREFIX, SIDE_FILE_PATTERNS
from .inspection import AdapterSummary, ModuleSummary, inspect_adapter
from .safetensors_io import write_safetensors

__all__ = [
    "ADAPTER_PREFIX",
    "DEFAULT_EVAL_TEXT",
    "SIDE_FILE_PATTERNS",
    "AdapterSummary",
    "Checkpoint",
    "EvalResult",
    "ModuleSummary",
    "apply_adapter",
    "compress_checkpoints",
    "evaluate_adapter",
    "inspect_adapter",
    "resolve_folder",
    "write_safetensors",
]
