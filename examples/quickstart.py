"""Compress a full fine-tune into an ImPart adapter, save it, load it back with transformers, and generate.

Runs on a CPU in a minute or two, with nothing to download: it builds a small Llama, "pre-trains" it for a few
steps on counting sequences, fully fine-tunes a copy to count in steps of 3, then ships the fine-tune as an
adapter 8x smaller than the dense delta. Copy the middle part for your own models: only the two
``from_pretrained`` calls change.

    python examples/quickstart.py [--ratio 8] [--output ./quickstart-adapter]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import impart_peft  # registers the IMPART adapter type with PEFT and transformers
from impart_peft import ImPartConfig, from_finetuned

VOCAB = 64


def counting_batch(step: int, generator: torch.Generator, batch: int = 16, length: int = 24) -> torch.Tensor:
    start = torch.randint(0, VOCAB, (batch, 1), generator=generator)
    return (start + step * torch.arange(length)) % VOCAB


def train(model, step: int, iterations: int, lr: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(iterations):
        ids = counting_batch(step, generator)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def accuracy(model, step: int) -> float:
    """Exact next-token accuracy on held-out sequences that count in steps of ``step``."""
    ids = counting_batch(step, torch.Generator().manual_seed(1234), batch=64)
    with torch.no_grad():
        predicted = model(ids).logits[:, 3:-1].argmax(-1)
    return float((predicted == ids[:, 4:]).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ratio", type=float, default=8.0, help="compression ratio of the delta (default 8)")
    parser.add_argument(
        "--output", default=None, help="where to save the adapter (default: a temporary folder)"
    )
    args = parser.parse_args()
    torch.manual_seed(0)

    print("1. a small Llama, pre-trained on counting by 1 and 2 ...")
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(config)
    for step in (1, 2):
        train(base, step, 40, 1e-3, seed=step)
    print("2. ... and a full fine-tune (every parameter) that counts by 3")
    finetuned = train(copy.deepcopy(base), 3, 50, 3e-4, seed=3)

    print(f"3. compress the fine-tune at {args.ratio:g}x")
    adapter_config = ImPartConfig(compression_ratio=args.ratio, pre_prune_ratio=0.9)
    model = from_finetuned(copy.deepcopy(base), finetuned, adapter_config)
    output = args.output or tempfile.mkdtemp(prefix="impart-quickstart-")
    model.save_pretrained(output)
    base_dir = os.path.join(output, "_base")
    base.save_pretrained(base_dir)

    print("4. load it back the transformers way: base.load_adapter(path)")
    loaded = AutoModelForCausalLM.from_pretrained(base_dir)
    loaded.load_adapter(output)

    dense_delta = sum(p.numel() * p.element_size() for p in finetuned.parameters())
    adapter_bytes = os.path.getsize(os.path.join(output, "adapter_model.safetensors"))
    ids = counting_batch(3, torch.Generator().manual_seed(99), batch=4)
    with torch.no_grad():
        log_p = F.log_softmax(finetuned(ids).logits.double(), -1)
        log_q = F.log_softmax(loaded(ids).logits.double(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    print()
    print(
        f"adapter: {output}  ({adapter_bytes / 1e6:.2f} MB; the dense fine-tune is {dense_delta / 1e6:.2f} MB)"
    )
    print(
        f"counting-by-3 accuracy   base {accuracy(base, 3):.1%}   fine-tune {accuracy(finetuned, 3):.1%}   "
        f"base + ImPart adapter {accuracy(loaded, 3):.1%}"
    )
    print(f"next-token KL(fine-tune || base + adapter) = {float(kl):.4f}")

    prompt = torch.tensor([[5, 8, 11]])
    for name, generator_model in (("fine-tune", finetuned), ("base + adapter", loaded), ("base", base)):
        with torch.no_grad():
            out = generator_model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        print(f"generate from 5 8 11 with {name:>14}: {' '.join(map(str, out[0].tolist()))}")
    assert impart_peft.IMPART_PEFT_TYPE.value == loaded.peft_config["default"].peft_type.value


if __name__ == "__main__":
    main()
