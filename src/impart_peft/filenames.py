"""The names of the files in model and adapter folders (no dependency: every layer may import it)."""

from __future__ import annotations

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_PREFIX",
    "ADAPTER_WEIGHTS",
    "SIDE_FILE_PATTERNS",
    "TOKENIZER_FILE_PATTERNS",
]

ADAPTER_PREFIX = "base_model.model."  # how PeftModel.save_pretrained names adapter tensors
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Files besides the weights that make a model folder usable: tokenizer, chat template, generation defaults.
SIDE_FILE_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.tiktoken",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
TOKENIZER_FILE_PATTERNS = tuple(p for p in SIDE_FILE_PATTERNS if p not in ("generation_config.json",))
