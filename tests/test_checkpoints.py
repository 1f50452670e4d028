"""compress_checkpoints / apply_adapter / inspect_adapter / evaluate_adapter on tiny real models saved as sharded
safetensors checkpoints (Llama tied and untied, fp32 and bf16; GPT-2 with Conv1D and LayerNorm biases)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from impart_peft import ImPartConfig, from_finetuned
from impart_peft.checkpoints import (
    Checkpoint,
    apply_adapter,
    compress_checkpoints,
    evaluate_adapter,
    inspect_adapter,
    write_safetensors,
)

VOCAB = 96
SHARD = "12KB"  # several shards even for these tiny models


def tiny_model(arch: str, tie: bool, width: int = 32, vocab: int = VOCAB, seed: int = 0, layers: int = 2):
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            tie_word_embeddings=tie,
            bos_token_id=1,
            eos_token_id=2,
        )
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(
        vocab_size=vocab, n_embd=width, n_layer=2, n_head=4, n_positions=64, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return GPT2LMHeadModel(config).eval()


def finetune(model, steps: int = 3, seed: int = 1):
    """A few real Adam steps on every parameter: a full fine-tune in miniature."""
    generator = torch.Generator().manual_seed(seed)
    model = model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        ids = torch.randint(3, model.config.vocab_size, (4, 16), generator=generator)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def save_pair(
    root: Path, arch: str = "llama", tie: bool = False, dtype: torch.dtype = torch.float32, width: int = 32
) -> tuple[Path, Path]:
    """A (base, fine-tune) pair saved as sharded safetensors checkpoints under ``root``."""
    base = tiny_model(arch, tie, width)
    base.save_pretrained(root / "base", max_shard_size=SHARD)
    finetuned = tiny_model(arch, tie, width)
    finetuned.load_state_dict(base.state_dict())
    finetuned = finetune(finetuned)
    if dtype != torch.float32:
        base.to(dtype).save_pretrained(root / "base", max_shard_size=SHARD)
        finetuned.to(dtype)
    finetuned.save_pretrained(root / "ft", max_shard_size=SHARD)
    return root / "base", root / "ft"


def load(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()


def reference_adapter(base_dir: Path, ft_dir: Path, config: ImPartConfig, out: Path):
    """from_finetuned + save_pretrained on the same checkpoints, loaded in full (the in-memory path)."""
    model = from_finetuned(load(base_dir), load(ft_dir), config)
    model.save_pretrained(out)
    return model


CASES = {
    "llama-fp32-tied": ("llama", True, torch.float32),
    "llama-bf16": ("llama", False, torch.bfloat16),
    "gpt2-fp16-tied": ("gpt2", True, torch.float16),
}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    arch, tie, dtype = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    base_dir, ft_dir = save_pair(root, arch, tie, dtype)
    config = ImPartConfig(compression_ratio=4.0, seed=7)
    reference = reference_adapter(base_dir, ft_dir, config, root / "reference")
    compress_checkpoints(base_dir, ft_dir, root / "streamed", config, progress=False)
    return {
        "root": root,
        "base": base_dir,
        "ft": ft_dir,
        "config": config,
        "reference": reference,
        "dtype": dtype,
    }


def sample_ids(vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(123))


def test_checkpoints_are_sharded_and_tied_head_omitted(pair):
    # What the other tests rely on: several shards, and a tied head that the checkpoint does not store.
    index = json.loads((pair["base"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    checkpoint = Checkpoint(pair["base"])
    assert {info.dtype for info in checkpoint.tensors.values()} == {pair["dtype"]}
    if json.loads((pair["base"] / "config.json").read_text())["tie_word_embeddings"]:
        assert "lm_head.weight" not in checkpoint.tensors


def test_same_adapter_bytes_as_from_finetuned(pair):
    out = pair["root"] / "streamed"
    ours = (out / "adapter_model.safetensors").read_bytes()
    reference = (pair["root"] / "reference" / "adapter_model.safetensors").read_bytes()
    assert ours == reference

    ours_config = json.loads((out / "adapter_config.json").read_text())
    reference_config = json.loads((pair["root"] / "reference" / "adapter_config.json").read_text())
    # Field for field, auto_mapping, fingerprints and the base / fine-tune names included (given as the same paths).
    assert ours_config == reference_config
    assert ours_config["base_model_name_or_path"] == os.fspath(pair["base"])
    assert ours_config["finetuned_model_name_or_path"] == os.fspath(pair["ft"])


def test_streamed_adapter_loads_like_the_reference(pair):
    out = pair["root"] / "streamed"
    ids = sample_ids()
    with torch.no_grad():
        expected = pair["reference"](ids).logits
        peft_model = PeftModel.from_pretrained(load(pair["base"]), out).eval()
        assert torch.equal(peft_model(ids).logits, expected)
        model = load(pair["base"])
        model.load_adapter(os.fspath(out), adapter_name="impart")
        assert torch.equal(model(ids).logits, expected)
        # ...and it is not the base: the adapter changes the outputs.
        assert not torch.equal(load(pair["base"])(ids).logits, expected)


def test_apply_writes_the_merged_fine_tune(pair):
    adapter = pair["root"] / "reference"
    out = pair["root"] / "applied"
    apply_adapter(pair["base"], adapter, out, max_shard_size="10KB", progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert (out / "config.json").read_text() == (pair["base"] / "config.json").read_text()
    assert (out / "generation_config.json").is_file()

    applied = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    merged = PeftModel.from_pretrained(load(pair["base"]), adapter).merge_and_unload().eval()
    applied_state, merged_state = applied.state_dict(), merged.state_dict()
    assert applied_state.keys() == merged_state.keys()
    for key, tensor in merged_state.items():
        assert applied_state[key].dtype == pair["dtype"]
        assert torch.equal(applied_state[key], tensor), key
    ids = sample_ids()
    with torch.no_grad():
        assert torch.equal(applied(ids).logits, merged(ids).logits)


def test_inspect_counts_match_the_file(pair):
    out = pair["root"] / "reference"
    summary = inspect_adapter(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert [m.name for m in summary.modules] == list(config["module_meta"])
    assert summary.file_bytes == (out / "adapter_model.safetensors").stat().st_size
    tensors = load_file(out / "adapter_model.safetensors")
    for module in summary.modules:
        own = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == f"base_model.model.{module.name}"}
        assert module.stored_bytes == sum(t.numel() * t.element_size() for t in own.values())
        assert module.stored_values == sum(t.numel() for k, t in own.items() if not k.endswith("keep_count"))
        if module.kind in ("linear", "conv1d", "embedding"):
            u = own[f"base_model.model.{module.name}.impart_u_values"]
            v = own[f"base_model.model.{module.name}.impart_v_values"]
            assert module.factor_values == u.numel() + v.numel()
            assert module.rank == own[f"base_model.model.{module.name}.impart_singular_values"].numel()
            # The budget is met per matrix, to the rounding of these tiny shapes.
            assert module.nominal_ratio == pytest.approx(4.0, rel=0.15)
    dense = sum(m.dense_bytes for m in summary.modules)
    assert summary.disk_ratio == pytest.approx(dense / summary.file_bytes)
    assert summary.other_tensors == {}


def test_write_safetensors_matches_save_file(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(5, 3, generator=generator),
        "a.threshold": torch.randint(0, 2**32, (7,), generator=generator),
        "c.values": torch.randn(11, generator=generator).to(torch.bfloat16),
        "a.half": torch.randn(4, generator=generator).half(),
        "z.double": torch.randn(2, 2, generator=generator).double(),
        "m.mask": torch.rand(9, generator=generator) > 0.5,
        "empty": torch.zeros(0),
        "i8": torch.randint(-100, 100, (6,), generator=generator).to(torch.int8),
    }
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    write_safetensors(tmp_path / "streamed.safetensors", tensors, metadata={"format": "pt"})
    assert (tmp_path / "streamed.safetensors").read_bytes() == (
        tmp_path / "reference.safetensors"
    ).read_bytes()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    base_dir, ft_dir = save_pair(root, "llama", tie=False, dtype=torch.bfloat16)
    return root, base_dir, ft_dir


def test_interrupted_run_leaves_nothing(llama, tmp_path):
    root, base_dir, ft_dir = llama
    # A fine-tune whose last decoder layer holds a NaN: compression fails after most tensors were written.
    broken = tmp_path / "broken-ft"
    broken.mkdir()
    index = json.loads((ft_dir / "model.safetensors.index.json").read_text())
    target = "model.layers.1.mlp.down_proj.weight"
    for file in ft_dir.iterdir():
        if file.name != index["weight_map"][target]:
            (broken / file.name).write_bytes(file.read_bytes())
    shard = load_file(ft_dir / index["weight_map"][target])
    shard[target][0, 0] = float("nan")
    save_file(shard, broken / index["weight_map"][target], metadata={"format": "pt"})

    out = tmp_path / "adapters" / "broken"
    with pytest.raises(ValueError, match="model.layers.1.mlp.down_proj.weight of the fine-tune contains NaN"):
        compress_checkpoints(base_dir, broken, out, progress=False)
    assert list((tmp_path / "adapters").iterdir()) == []  # no output, no scratch folder


def test_existing_output_needs_overwrite(llama, tmp_path):
    _, base_dir, ft_dir = llama
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        compress_checkpoints(base_dir, ft_dir, out, progress=False)
    assert (out / "keep.txt").read_text() == "user data"
    compress_checkpoints(base_dir, ft_dir, out, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".md") == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "generation_config.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # the replaced folder is gone too


def test_fine_tune_with_added_tokens_is_refused(llama, tmp_path):
    _, base_dir, ft_dir = llama
    model = load(ft_dir)
    model.resize_token_embeddings(VOCAB + 8)
    model.save_pretrained(tmp_path / "bigger", max_shard_size=SHARD)
    with pytest.raises(
        ValueError, match=r"vocabulary has 104 tokens and the base's 96.*resize_token_embeddings"
    ):
        compress_checkpoints(base_dir, tmp_path / "bigger", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("other", ["gpt2", "wider-llama", "deeper-llama"])
def test_mismatched_pair_is_refused(llama, tmp_path, other):
    _, base_dir, _ = llama
    model = {
        "gpt2": lambda: tiny_model("gpt2", False),
        "wider-llama": lambda: tiny_model("llama", False, width=48),
        "deeper-llama": lambda: tiny_model("llama", False, layers=3),
    }[other]()
    model.save_pretrained(tmp_path / other)
    with pytest.raises(ValueError, match="not the same architecture"):
        compress_checkpoints(base_dir, tmp_path / other, tmp_path / "out", progress=False)


def test_missing_folder_and_non_safetensors_folder(llama, tmp_path):
    _, base_dir, ft_dir = llama
    with pytest.raises(FileNotFoundError, match="the base folder .* does not exist"):
        compress_checkpoints(tmp_path / "nope", ft_dir, tmp_path / "out", progress=False)
    legacy = tmp_path / "legacy"
    load(ft_dir).save_pretrained(legacy)
    for file in legacy.glob("*.safetensors"):
        torch.save(load_file(file), legacy / "pytorch_model.bin")
        file.unlink()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors.*pytorch_model.bin"):
        compress_checkpoints(base_dir, legacy, tmp_path / "out", progress=False)


def test_identical_pair_has_nothing_to_compress(llama, tmp_path):
    _, base_dir, _ = llama
    with pytest.raises(ValueError, match="identical to the base"):
        compress_checkpoints(base_dir, base_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_apply_refuses_another_base(llama, tmp_path):
    root, base_dir, ft_dir = llama
    adapter = tmp_path / "adapter"
    compress_checkpoints(base_dir, ft_dir, adapter, progress=False)
    other = tmp_path / "other-base"
    tiny_model("llama", False, seed=5).to(torch.bfloat16).save_pretrained(other)
    with pytest.raises(ValueError, match="differs from the one the adapter was compressed against"):
        apply_adapter(other, adapter, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()


def test_eval_measures_the_gap(llama, tmp_path):
    _, base_dir, ft_dir = llama
    lossless, lossy = tmp_path / "lossless", tmp_path / "lossy"
    compress_checkpoints(base_dir, ft_dir, lossless, ImPartConfig(compression_ratio=None), progress=False)
    compress_checkpoints(base_dir, ft_dir, lossy, ImPartConfig(compression_ratio=8.0), progress=False)
    text = "A short text that these byte-level test models read as token ids. " * 3
    exact = evaluate_adapter(base_dir, ft_dir, lossless, text, max_tokens=64)
    rough = evaluate_adapter(base_dir, ft_dir, lossy, text, max_tokens=64)

    # The same numbers computed here from the three models, on the ids the docs promise (UTF-8 bytes, no tokenizer).
    assert exact.tokens == 64 and exact.tokenizer.startswith("UTF-8 bytes")
    ids = torch.tensor([list(text.encode())[:64]]) % VOCAB
    with torch.no_grad():
        logp = {
            name: torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            for name, model in {
                "ft": load(ft_dir),
                "base": load(base_dir),
                "lossy": PeftModel.from_pretrained(load(base_dir), lossy),
            }.items()
        }
    kl = {k: float((logp["ft"].exp() * (logp["ft"] - v)).sum(-1).mean()) for k, v in logp.items()}
    ppl = {k: float(torch.exp(-v.gather(-1, ids[0, 1:, None]).mean())) for k, v in logp.items()}
    assert rough.kl_adapter == pytest.approx(kl["lossy"], rel=1e-4)
    assert rough.kl_base == pytest.approx(kl["base"], rel=1e-4)
    assert rough.perplexity_adapter == pytest.approx(ppl["lossy"], rel=1e-4)
    assert rough.perplexity_finetuned == pytest.approx(ppl["ft"], rel=1e-4)
    assert rough.perplexity_base == pytest.approx(ppl["base"], rel=1e-4)

    assert exact.kl_base > 1e-3  # the fine-tune moved away from the base...
    assert (
        exact.kl_adapter < 1e-2 * exact.kl_base
    )  # ...and the lossless adapter (bf16 factors) brings it back
    assert exact.kl_adapter < rough.kl_adapter


def test_fingerprint_of_an_embedding_with_more_than_2_24_elements():
    # A 7B Llama's 32000 x 4096 embedding: float32 positions once ran past its end (found by benchmarks/memory.py).
    from impart_peft.fingerprint import weight_fingerprint

    weight = torch.zeros(32000, 4096, dtype=torch.uint8)
    weight[-1, -1] = 7
    assert weight_fingerprint(weight)[-1] == 7.0


def test_checkpoint_keys_without_the_base_model_prefix(tmp_path):
    # Old GPT-2 checkpoints store "h.0.attn.c_attn.weight" where the model has "transformer.h.0.attn.c_attn.weight".
    base = tiny_model("gpt2", True)
    finetuned = finetune(tiny_model("gpt2", True))
    for name, model in (("base", base), ("ft", finetuned)):
        model.save_pretrained(tmp_path / name)
        state = load_file(tmp_path / name / "model.safetensors")
        legacy = {k.removeprefix("transformer."): v.contiguous() for k, v in state.items()}
        save_file(legacy, tmp_path / name / "model.safetensors", metadata={"format": "pt"})
    assert "h.0.attn.c_attn.weight" in Checkpoint(tmp_path / "base").tensors
    compress_checkpoints(tmp_path / "base", tmp_path / "ft", tmp_path / "adapter", progress=False)
    apply_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", progress=False)
    merged = PeftModel.from_pretrained(load(tmp_path / "base"), tmp_path / "adapter").merge_and_unload()
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "merged")(sample_ids()).logits, merged(sample_ids()).logits)
