"""Tiny real models for the tests: built from configs, fine-tuned for a few real optimiser steps.

``make_pair("llama" | "gpt2", tie=False, steps=3)`` returns ``(base, finetuned)`` in eval mode whose every
parameter differs (a full fine-tune in miniature). Deterministic for a given seed.
"""

from __future__ import annotations

import copy

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 128


def tiny_config(arch: str, tie: bool = False, width: int = 32):
    if arch == "llama":
        return LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=tie,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB,
            n_embd=width,
            n_layer=2,
            n_head=4,
            n_positions=64,
            tie_word_embeddings=tie,
            bos_token_id=1,
            eos_token_id=2,
        )
    raise ValueError(arch)


def make_base(arch: str = "llama", tie: bool = False, seed: int = 0, width: int = 32):
    torch.manual_seed(seed)
    config = tiny_config(arch, tie, width)
    model = LlamaForCausalLM(config) if arch == "llama" else GPT2LMHeadModel(config)
    return model.eval()


def task_batch(generator: torch.Generator, seed: int, batch: int = 8, length: int = 16) -> torch.Tensor:
    """Sequences of a learnable task: each token is the previous one plus a task-specific step (mod vocab)."""
    step = 1 + seed % 5
    start = torch.randint(3, VOCAB, (batch, 1), generator=generator)
    return 3 + (start - 3 + step * torch.arange(length)) % (VOCAB - 3)


def finetune(base, steps: int = 20, seed: int = 1, lr: float = 3e-3):
    """A full fine-tune: Adam on every parameter for ``steps`` steps of next-token loss on a task
    (:func:`task_batch`), so the delta carries a real, structured signal."""
    generator = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        ids = task_batch(generator, seed)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def make_pair(arch: str = "llama", tie: bool = False, steps: int = 20, seed: int = 0, width: int = 32):
    base = make_base(arch, tie, seed, width)
    return base, finetune(base, steps, seed + 1)


def sample_ids(seed: int = 123, batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
