"""Loading an adapter is loading untrusted input: a seeded fuzz suite over real saved adapters.

From a plain ImPart and an ImPart-QT adapter saved by ``save_pretrained`` (a tiny tied Llama, real fine-tuning
deltas), a few hundred corrupted variants are built -- truncations, bit flips in the safetensors header and data,
swapped tensors, NaN / inf values, edited ``adapter_config.json`` fields -- and each is loaded through
``PeftModel.from_pretrained`` or transformers' ``load_adapter`` (alternately). Each must either load to exactly the
original logits (a harmless change) or raise :class:`~impart_peft.validation.InvalidAdapterError`, with the base
model then bit for bit as before and nothing injected; anything else (another exception, other logits, a load
running past its time limit) is counted and fails the test.

Some variants are "re-signed": their digests recomputed after the edit, as a hostile author would write them, so
that each structural check is shown to refuse them on its own, not only the digest.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import json
import math
import os
import random
import re
import signal
import struct
import time

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

import impart_peft  # noqa: F401  (registers the adapter type)
from impart_peft import ImPartConfig, ImPartLayer, from_finetuned
from impart_peft.validation import InvalidAdapterError, module_digest, validate_adapter
from tiny_models import make_pair, sample_ids

SEED = 14
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
PER_LOAD_SECONDS = 30
# Of the ~950 variants built per adapter, this many, spread over every kind of corruption (the time bound).
VARIANTS_PER_ADAPTER = 300


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _fingerprint_of_base(model) -> dict:
    """Everything a failed load could change: every tensor's bytes, the module tree, the adapter attributes."""
    tensors = {k: v.detach().contiguous().view(torch.uint8).clone() for k, v in model.state_dict().items()}
    modules = [(name, type(m).__name__) for name, m in model.named_modules()]
    flags = [p.requires_grad for p in model.parameters()]
    attrs = {k: model.__dict__.get(k) for k in ("peft_config", "_hf_peft_config_loaded")}
    return {"tensors": tensors, "modules": modules, "flags": flags, "attrs": attrs}


def _same_base(before: dict, model) -> str | None:
    after = _fingerprint_of_base(model)
    if after["modules"] != before["modules"]:
        return "module tree changed"
    if after["tensors"].keys() != before["tensors"].keys():
        return "state dict keys changed"
    for key, value in before["tensors"].items():
        if not torch.equal(value, after["tensors"][key]):
            return f"tensor {key} changed"
    if after["flags"] != before["flags"]:
        return "requires_grad flags changed"
    if after["attrs"] != before["attrs"]:
        return f"adapter attributes changed: {after['attrs']}"
    if any(isinstance(m, ImPartLayer) for m in model.modules()):
        return "an ImPart layer was left"
    return None


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    base, ft = make_pair("llama", tie=True)
    ids = sample_ids()
    out = {}
    for label, config in (
        ("plain", ImPartConfig(compression_ratio=8, seed=3)),
        ("qt", ImPartConfig(compression_ratio=8, seed=5, quantization={"bits": [8, 4, 2]})),
    ):
        folder = tmp_path_factory.mktemp(label)
        from_finetuned(copy.deepcopy(base), ft, config).save_pretrained(folder)
        reference = PeftModel.from_pretrained(copy.deepcopy(base), folder)
        out[label] = {
            "folder": folder,
            "config": (folder / CONFIG).read_bytes(),
            "weights": (folder / WEIGHTS).read_bytes(),
            "logits": _logits(reference, ids),
        }
    return base, ids, out


# ---------------------------------------------------------------------------------------------------- variants
def _layout(weights: bytes) -> tuple[int, dict]:
    (length,) = struct.unpack("<Q", weights[:8])
    header = json.loads(weights[8 : 8 + length])
    header.pop("__metadata__", None)
    return 8 + length, header


def _resign(config: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """Recompute every module's digest for the edited config and tensors (what a hostile author would do)."""
    config = copy.deepcopy(config)
    for name, meta in config["module_meta"].items():
        if not isinstance(meta, dict):
            continue
        own = {
            k.removeprefix(f"{PREFIX}{name}."): t
            for k, t in tensors.items()
            if k.startswith(f"{PREFIX}{name}.impart_")
        }
        with contextlib.suppress(TypeError, ValueError):  # a seed or version the edit made unusable
            meta["digest"] = module_digest(
                name, meta, int(config["seed"]), int(config["format_version"]), own
            )
    return config


def _variants(original: dict, rng: random.Random) -> list[tuple[str, bytes, bytes]]:
    """``(label, config bytes, weights bytes)`` of the corrupted variants of one saved adapter."""
    config_bytes, weights = original["config"], original["weights"]
    config = json.loads(config_bytes)
    data_start, header = _layout(weights)
    tensors = load_file(original["folder"] / WEIGHTS)
    names = sorted(config["module_meta"])
    matrices = [n for n in names if config["module_meta"][n].get("rank")]
    out: list[tuple[str, bytes, bytes]] = []

    def dump(cfg: dict) -> bytes:
        return json.dumps(cfg, indent=2).encode()

    def with_tensors(
        label: str, new: dict[str, torch.Tensor], cfg: dict | None = None, resign: bool = False
    ) -> None:
        cfg = cfg if cfg is not None else config
        path = original["folder"].parent / f"scratch-{os.getpid()}.safetensors"
        save_file(new, path, metadata={"format": "pt"})
        data = path.read_bytes()
        path.unlink()
        out.append((label, dump(cfg), data))
        if resign:
            out.append((label + " (re-signed)", dump(_resign(cfg, new)), data))

    # Truncations of the weights at many offsets (the header, its boundary, the data), and of the config.
    cuts = {0, 1, 7, 8, 9, data_start - 1, data_start, data_start + 1, len(weights) - 1}
    cuts |= {rng.randrange(8, data_start) for _ in range(12)} | {
        rng.randrange(data_start, len(weights)) for _ in range(18)
    }
    for cut in sorted(cuts):
        out.append((f"weights truncated at {cut}", config_bytes, weights[:cut]))
    for cut in sorted({rng.randrange(0, len(config_bytes)) for _ in range(8)}):
        out.append((f"config truncated at {cut}", config_bytes[:cut], weights))
    out.append(("weights with a trailing byte", config_bytes, weights + b"\0"))
    # Bit flips in the header (length prefix and JSON) and in the data.
    for position in sorted({rng.randrange(0, data_start) for _ in range(40)}):
        flipped = bytearray(weights)
        flipped[position] ^= 1 << rng.randrange(8)
        out.append((f"header bit flip at {position}", config_bytes, bytes(flipped)))
    for position in sorted({rng.randrange(data_start, len(weights)) for _ in range(40)}):
        flipped = bytearray(weights)
        flipped[position] ^= 1 << rng.randrange(8)
        out.append((f"data bit flip at {position}", config_bytes, bytes(flipped)))
    # Swapped tensors: two modules' tensors of the same dtype, U and V of one module, the counts of two modules.
    same_shape = collections.defaultdict(list)
    for key, tensor in tensors.items():
        same_shape[(tensor.dtype, tuple(tensor.shape), key.rsplit(".", 1)[1])].append(key)
    swaps = [keys[:2] for keys in same_shape.values() if len(keys) >= 2][:6]
    for a, b in swaps:
        new = dict(tensors)
        new[a], new[b] = tensors[b], tensors[a]
        with_tensors(f"swapped {a} and {b}", new)
    for name in matrices[:4]:
        meta = config["module_meta"][name]
        kind = "codes" if "quantized" in meta else "values"
        new = dict(tensors)
        u, v = f"{PREFIX}{name}.impart_u_{kind}", f"{PREFIX}{name}.impart_v_{kind}"
        new[u], new[v] = tensors[v], tensors[u]
        with_tensors(f"{name}: U and V swapped", new, resign=True)
        counts = f"{PREFIX}{name}.impart_keep_count"
        new = dict(tensors)
        new[counts] = tensors[counts].flip(0).contiguous()
        with_tensors(f"{name}: keep count rows swapped", new, resign=True)
    # NaN / inf in each kind of float tensor (re-signed too: the finiteness check alone must refuse them).
    float_keys = [k for k, t in tensors.items() if t.is_floating_point()]
    for key in rng.sample(float_keys, min(10, len(float_keys))):
        for bad in (math.nan, math.inf, -math.inf):
            new = dict(tensors)
            edited = tensors[key].clone()
            edited.view(-1)[rng.randrange(edited.numel())] = bad
            new[key] = edited
            with_tensors(f"{key} holds {bad}", new, resign=True)
    # Tensors of another dtype, an extra tensor, a missing tensor.
    for key in rng.sample(sorted(tensors), 4):
        new = dict(tensors)
        new[key] = tensors[key].to(torch.float64 if tensors[key].dtype != torch.float64 else torch.float32)
        with_tensors(f"{key} as {new[key].dtype}", new, resign=True)
        new = {k: t for k, t in tensors.items() if k != key}
        with_tensors(f"{key} missing", new, resign=True)
    with_tensors(
        "an extra tensor", {**tensors, f"{PREFIX}model.norm.impart_extra": torch.zeros(3)}, resign=True
    )

    # Edited adapter_config.json fields.
    def edit(label: str, change, resign: bool = False) -> None:
        cfg = copy.deepcopy(config)
        change(cfg)
        out.append((label, dump(cfg), weights))
        if resign:
            out.append((label + " (re-signed)", dump(_resign(cfg, tensors)), weights))

    huge = [2**31, 2**40, 2**62, 2**64, -1, -(2**40), 0]
    odd = [None, "12", 1.5, math.nan, math.inf, True, [], {}]
    for value in [4, 0, 2**64 - 1, 2**64, -1, "3", 3.0, True, None, math.nan, [3]]:
        edit(f"seed = {value!r}", lambda c, v=value: c.__setitem__("seed", v))
    edit("seed deleted", lambda c: c.pop("seed"))
    for value in [1, 3, "2", None, 2.0, True, -2, 2**64]:
        edit(f"format_version = {value!r}", lambda c, v=value: c.__setitem__("format_version", v))
    edit("format_version deleted", lambda c: c.pop("format_version"))
    edit("module_meta deleted", lambda c: c.pop("module_meta"))
    edit("module_meta empty", lambda c: c.__setitem__("module_meta", {}))
    edit("module_meta a list", lambda c: c.__setitem__("module_meta", list(c["module_meta"])))
    edit("integrity edited", lambda c: c.__setitem__("integrity", "f" * 32))
    edit("integrity deleted", lambda c: c.pop("integrity"))
    edit("integrity a number", lambda c: c.__setitem__("integrity", 7))
    edit("an unknown top-level key", lambda c: c.__setitem__("surprise", {"x": 1}))
    edit("base_model_name_or_path edited", lambda c: c.__setitem__("base_model_name_or_path", "org/other"))
    edit("compression_ratio = 0.5", lambda c: c.__setitem__("compression_ratio", 0.5))
    edit("compression_ratio = 'x'", lambda c: c.__setitem__("compression_ratio", "x"))
    edit("quantization = 7", lambda c: c.__setitem__("quantization", 7))
    edit("allocation = 'dare'", lambda c: c.__setitem__("allocation", "dare"))
    edit("base_check = 'maybe'", lambda c: c.__setitem__("base_check", "maybe"))
    for name in rng.sample(names, min(6, len(names))):
        meta = config["module_meta"][name]
        fields = sorted(meta)
        for field in fields:
            for value in rng.sample(huge + odd, 4):
                edit(
                    f"{name}.{field} = {value!r}",
                    lambda c, n=name, f=field, v=value: c["module_meta"][n].__setitem__(f, v),
                    resign=True,
                )
            edit(
                f"{name}.{field} deleted", lambda c, n=name, f=field: c["module_meta"][n].pop(f), resign=True
            )
        edit(
            f"{name}: an unknown field",
            lambda c, n=name: c["module_meta"][n].__setitem__("extra", 1),
            resign=True,
        )
        edit(
            f"{name} renamed",
            lambda c, n=name: c["module_meta"].__setitem__(n + "x", c["module_meta"].pop(n)),
            resign=True,
        )
        edit(f"{name} removed", lambda c, n=name: c["module_meta"].pop(n), resign=True)
        edit(
            f"{name} entry a string", lambda c, n=name: c["module_meta"].__setitem__(n, "linear"), resign=True
        )
        if "shape" in meta:
            m, n_ = meta["shape"]
            for shape in ([m + 1, n_], [n_, m], [m], [m, n_, 1], [0, n_], [m, 2**40]):
                edit(
                    f"{name}.shape = {shape}",
                    lambda c, n=name, s=shape: c["module_meta"][n].__setitem__("shape", s),
                    resign=True,
                )
        if meta.get("rank"):
            r = meta["rank"]
            for field, delta in (
                ("rank", 1),
                ("rank", -1),
                ("u_count", 1),
                ("u_count", -1),
                ("v_count", 1),
                ("v_count", -1),
            ):
                edit(
                    f"{name}.{field} {delta:+d}",
                    lambda c, n=name, f=field, d=delta: c["module_meta"][n].__setitem__(
                        f, c["module_meta"][n][f] + d
                    ),
                    resign=True,
                )
            edit(
                f"{name}.u_count = r*m+1",
                lambda c, n=name, r=r, m=meta["shape"][0]: c["module_meta"][n].__setitem__(
                    "u_count", r * m + 1
                ),
                resign=True,
            )
            for dtype in ("float64", "bfloat16", "int32", "bogus"):
                edit(
                    f"{name}.dtype = {dtype}",
                    lambda c, n=name, d=dtype: c["module_meta"][n].__setitem__("dtype", d),
                    resign=True,
                )
            for kind in ("linear", "conv1d", "embedding", "vector", "tied", "lora"):
                if kind != meta["kind"]:
                    edit(
                        f"{name}.kind = {kind}",
                        lambda c, n=name, k=kind: c["module_meta"][n].__setitem__("kind", k),
                        resign=True,
                    )
        if "quantized" in meta:
            for field in sorted(meta["quantized"]):
                for value in ("+1", "-1", 0, 2**40, None):

                    def change(c, n=name, f=field, v=value):
                        q = c["module_meta"][n]["quantized"]
                        q[f] = (q[f] + int(v)) if isinstance(v, str) and isinstance(q[f], int) else v

                    edit(f"{name}.quantized.{field} {value}", change, resign=True)
            edit(
                f"{name}.quantized.bits = [[9, r]]",
                lambda c, n=name, r=meta["rank"]: c["module_meta"][n]["quantized"].__setitem__(
                    "bits", [[9, r]]
                ),
                resign=True,
            )
        if "vectors" in meta:
            for param, length in meta["vectors"].items():
                for value in (length + 1, length - 1, 0, -3, 2**40):
                    edit(
                        f"{name}.vectors.{param} = {value}",
                        lambda c, n=name, p=param, v=value: c["module_meta"][n]["vectors"].__setitem__(p, v),
                        resign=True,
                    )
            edit(
                f"{name}.vector_dtype = float16",
                lambda c, n=name: c["module_meta"][n].__setitem__("vector_dtype", "float16"),
                resign=True,
            )
        if "digest" in meta:
            edit(
                f"{name}.digest edited", lambda c, n=name: c["module_meta"][n].__setitem__("digest", "0" * 32)
            )
            # Without its digest, the module is checked for everything else and loads as before.
            edit(f"{name}.digest deleted", lambda c, n=name: c["module_meta"][n].pop("digest"))
    # Extra modules: one that does not exist in the base, one that exists but is not in the file.
    donor = config["module_meta"][matrices[0]]
    edit(
        "an extra module that is not in the base",
        lambda c: c["module_meta"].__setitem__("model.nowhere", copy.deepcopy(donor)),
        resign=True,
    )
    edit(
        "an extra module the file lacks",
        lambda c: c["module_meta"].__setitem__(
            "model.layers.1.mlp.up_proj"
            if matrices[0] != "model.layers.1.mlp.up_proj"
            else "model.layers.0.mlp.up_proj",
            copy.deepcopy(donor),
        ),
        resign=True,
    )
    # The base fingerprint: a tiny change passes (the tolerance), a large one or garbage is refused.
    fingerprinted = sorted(config.get("base_fingerprint") or {})
    for name in fingerprinted[:3]:
        edit(
            f"{name} fingerprint nudged by 1e-9",
            lambda c, n=name: c["base_fingerprint"].__setitem__(
                n, [x + 1e-9 for x in c["base_fingerprint"][n]]
            ),
        )
        edit(
            f"{name} fingerprint scaled x3",
            lambda c, n=name: c["base_fingerprint"].__setitem__(
                n, [3 * x + 1 for x in c["base_fingerprint"][n]]
            ),
        )
        edit(
            f"{name} fingerprint NaN", lambda c, n=name: c["base_fingerprint"].__setitem__(n, [math.nan] * 8)
        )
        edit(f"{name} fingerprint a string", lambda c, n=name: c["base_fingerprint"].__setitem__(n, "x"))
    edit(
        "a fingerprint of a module not in module_meta",
        lambda c: c["base_fingerprint"].__setitem__("model.nowhere", [0.0] * 8),
    )
    return out


def _category(label: str, names: list[str]) -> str:
    """What kind of corruption a label describes, without the module, the offset or the value."""
    for name in sorted(names, key=len, reverse=True):
        label = label.replace(name, "M")
    return re.sub(r"-?\d+", "N", label.split(" = ")[0].split(" holds ")[0])


def _select(variants: list, names: list[str], budget: int, rng: random.Random) -> list:
    """A deterministic subset of ``budget`` variants spread over every category (round robin, shuffled)."""
    by_category: dict[str, list] = collections.defaultdict(list)
    for variant in variants:
        by_category[_category(variant[0], names)].append(variant)
    queues = [rng.sample(items, len(items)) for _, items in sorted(by_category.items())]
    chosen = []
    while len(chosen) < budget and any(queues):
        for queue in queues:
            if queue and len(chosen) < budget:
                chosen.append(queue.pop())
    return chosen


def _timeout(signum, frame):
    raise TimeoutError(f"a load ran past {PER_LOAD_SECONDS} s")


def test_fuzzed_adapters_load_identically_or_are_refused(adapters, tmp_path):
    base, ids, saved = adapters
    rng = random.Random(SEED)
    variants = []
    for label, original in saved.items():
        names = sorted(json.loads(original["config"])["module_meta"])
        chosen = _select(_variants(original, rng), names, VARIANTS_PER_ADAPTER, rng)
        variants += [(label, *variant) for variant in chosen]
    counts = collections.Counter()
    others = []
    start = time.monotonic()
    before_signal = signal.signal(signal.SIGALRM, _timeout)
    try:
        for index, (adapter, label, config_bytes, weights) in enumerate(variants):
            folder = tmp_path / f"v{index}"
            folder.mkdir()
            (folder / CONFIG).write_bytes(config_bytes)
            (folder / WEIGHTS).write_bytes(weights)
            model = copy.deepcopy(base)
            before = _fingerprint_of_base(model)
            path = "peft" if index % 2 == 0 else "load_adapter"
            signal.alarm(PER_LOAD_SECONDS)
            try:
                if path == "peft":
                    loaded = PeftModel.from_pretrained(model, folder)
                else:
                    model.load_adapter(str(folder))
                    loaded = model
                signal.alarm(0)
                if torch.equal(_logits(loaded, ids), saved[adapter]["logits"]):
                    counts["loaded identical"] += 1
                else:
                    counts["loaded DIFFERENT"] += 1
                    others.append((adapter, label, path, "loaded with other logits"))
            except InvalidAdapterError as error:
                signal.alarm(0)
                problem = _same_base(before, model)
                if problem is None and str(error):
                    counts["refused"] += 1
                else:
                    counts["refused, base CHANGED"] += 1
                    others.append((adapter, label, path, problem))
            except Exception as error:  # anything else is a failure of the loader's checks
                signal.alarm(0)
                counts["OTHER exception"] += 1
                others.append((adapter, label, path, f"{type(error).__name__}: {error}"[:300]))
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, before_signal)
    elapsed = time.monotonic() - start
    summary = {"variants": len(variants), **counts, "seconds": round(elapsed, 1)}
    print(f"\nfuzz summary: {json.dumps(summary)}")
    report = os.environ.get("IMPART_FUZZ_REPORT")
    if report:
        with open(report, "w") as handle:
            json.dump({"summary": summary, "others": others}, handle, indent=1)
    assert not others, (
        f"{len(others)} variant(s) neither loaded identically nor refused clearly:\n"
        + "\n".join(map(str, others[:20]))
    )
    assert counts["refused"] > 0.5 * len(variants)
    assert counts["loaded identical"] > 0
    assert len(variants) >= 300


# ---------------------------------------------------------------------------------------------------- targeted checks
def test_each_refusal_names_module_field_found_and_expected(adapters, tmp_path):
    base, _, saved = adapters
    config = json.loads(saved["plain"]["config"])
    name = next(n for n, m in config["module_meta"].items() if m.get("rank"))
    config["module_meta"][name]["u_count"] = 2**62
    with pytest.raises(InvalidAdapterError) as caught:
        validate_adapter(config, saved["plain"]["folder"] / WEIGHTS, base)
    error = caught.value
    assert (error.module, error.field) == (name, "u_count")
    assert str(2**62) in str(error) and "rank x" in str(error)


def test_a_hostile_size_is_refused_before_any_allocation(adapters, tmp_path):
    """u_count = 2**40 (8 TB of float64) must be refused from the config alone: not even the file is opened."""
    base, _, saved = adapters
    config = json.loads(saved["plain"]["config"])
    name = next(n for n, m in config["module_meta"].items() if m.get("rank"))
    config["module_meta"][name].update(rank=min(config["module_meta"][name]["shape"]), u_count=2**40)
    (tmp_path / CONFIG).write_text(json.dumps(config))
    (tmp_path / WEIGHTS).write_bytes(saved["plain"]["weights"])
    model = copy.deepcopy(base)
    before = _fingerprint_of_base(model)
    with pytest.raises(InvalidAdapterError, match="u_count"):
        model.load_adapter(str(tmp_path))
    assert _same_base(before, model) is None


def test_an_edited_seed_is_refused_on_both_paths_and_the_base_is_bit_identical(adapters, tmp_path):
    base, _, saved = adapters
    for label, original in saved.items():
        config = json.loads(original["config"])
        config["seed"] += 1
        folder = tmp_path / label
        folder.mkdir()
        (folder / CONFIG).write_text(json.dumps(config))
        (folder / WEIGHTS).write_bytes(original["weights"])
        for load in (
            lambda m, f=folder: PeftModel.from_pretrained(m, f),
            lambda m, f=folder: m.load_adapter(str(f)),
        ):
            model = copy.deepcopy(base)
            before = _fingerprint_of_base(model)
            with pytest.raises(InvalidAdapterError, match="digest"):
                load(model)
            assert _same_base(before, model) is None


def test_a_failing_loader_leaves_the_model_as_it_was(adapters, tmp_path, monkeypatch):
    """Defence in depth: should the library's loader fail after injection (here: the weights file is swapped for a
    truncated one between the check and the load), the model is put back as it was."""
    import impart_peft.validation as validation

    base, ids, saved = adapters
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / CONFIG).write_bytes(saved["plain"]["config"])
    (folder / WEIGHTS).write_bytes(saved["plain"]["weights"])
    real_validate = validation.validate_adapter

    def validate_then_truncate(*args, **kwargs):
        result = real_validate(*args, **kwargs)
        if args[1] is not None:  # the file check has passed: now the file changes under the loader
            (folder / WEIGHTS).write_bytes(saved["plain"]["weights"][:-100])
        return result

    monkeypatch.setattr(validation, "validate_adapter", validate_then_truncate)
    model = copy.deepcopy(base)
    model.load_adapter(str(saved["qt"]["folder"]), adapter_name="other")  # an adapter already there stays
    expected_other = _logits(model, ids)
    before = _fingerprint_of_base(model)
    with pytest.raises(Exception):  # noqa: B017  (whatever the library raises for a file that changed under it)
        model.load_adapter(str(folder), adapter_name="second")
    assert _fingerprint_of_base(model)["modules"] == before["modules"]
    assert set(model.peft_config) == {"other"}
    assert all("second" not in m.impart_meta for m in model.modules() if isinstance(m, ImPartLayer))
    assert torch.equal(_logits(model, ids), expected_other)


def test_impart_inspect_and_apply_refuse_a_corrupted_adapter(adapters, tmp_path, capsys):
    from impart_peft.checkpoint_apply import apply_adapter
    from impart_peft.cli import main
    from impart_peft.inspection import inspect_adapter

    base, _, saved = adapters
    base.save_pretrained(tmp_path / "base")
    folder = tmp_path / "adapter"
    folder.mkdir()
    config = json.loads(saved["qt"]["config"])
    config["seed"] = 0
    (folder / CONFIG).write_text(json.dumps(config))
    (folder / WEIGHTS).write_bytes(saved["qt"]["weights"])
    with pytest.raises(InvalidAdapterError, match="integrity"):
        inspect_adapter(folder)
    with pytest.raises(InvalidAdapterError, match="integrity"):
        apply_adapter(tmp_path / "base", folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert main(["inspect", str(folder)]) == 1
    assert "invalid ImPart adapter" in capsys.readouterr().err
    # The intact adapter still inspects and applies.
    assert main(["inspect", str(saved["qt"]["folder"])]) == 0


HUB_CHECK = """
import sys
import torch
import impart_peft
from peft import PeftModel
from transformers import AutoModelForCausalLM
from impart_peft.validation import InvalidAdapterError

def base():
    return AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()

for path in ("peft", "load_adapter"):
    model = base()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [type(m).__name__ for m in model.modules()]
    try:
        PeftModel.from_pretrained(model, "org/bad") if path == "peft" else model.load_adapter("org/bad")
    except InvalidAdapterError as error:
        assert "integrity" in str(error), error
    else:
        raise SystemExit(f"{path} loaded a corrupted adapter from the Hub")
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), path
    assert [type(m).__name__ for m in model.modules()] == modules, path
    assert "peft_config" not in model.__dict__ and not getattr(model, "_hf_peft_config_loaded", False), path
print("checked")  # (intact repos loading by id through these wrappers: tests/test_hub.py)
"""


def test_a_corrupted_hub_repo_is_refused_on_both_paths(adapters, tmp_path):
    """A repo id: the files are fetched into the cache, checked, and refused before anything is injected."""
    import subprocess
    import sys

    from hub_server import HubServer

    base, _, saved = adapters
    base.save_pretrained(tmp_path / "base")
    config = json.loads(saved["plain"]["config"])
    config["seed"] += 1
    with HubServer() as hub:
        hub.seed_repo("org/bad", {CONFIG: json.dumps(config).encode(), WEIGHTS: saved["plain"]["weights"]})
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
        env.update(
            HF_ENDPOINT=hub.url,
            HF_HOME=str(tmp_path / "home"),
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            TRANSFORMERS_VERBOSITY="error",
        )
        result = subprocess.run(
            [sys.executable, "-c", HUB_CHECK, str(tmp_path / "base")],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert result.returncode == 0 and "checked" in result.stdout, result.stderr[-4000:]


@pytest.mark.parametrize("path", ["peft", "load_adapter"])
def test_a_failure_mid_injection_leaves_the_model_as_it_was(adapters, monkeypatch, path):
    """Defence in depth on both paths: a loader failing after some layers were injected (here the third
    injection raises) leaves the base as before the call: same module tree, tensors, flags, attributes."""
    from impart_peft.model import ImPartModel

    base, _, saved = adapters
    real = ImPartModel._create_and_replace
    calls = []

    def fail_on_third(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated failure during injection")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ImPartModel, "_create_and_replace", fail_on_third)
    model = copy.deepcopy(base)
    before = _fingerprint_of_base(model)
    with pytest.raises(RuntimeError, match="simulated"):
        if path == "peft":
            PeftModel.from_pretrained(model, saved["plain"]["folder"])
        else:
            model.load_adapter(str(saved["plain"]["folder"]))
    assert len(calls) == 3
    assert _same_base(before, model) is None
