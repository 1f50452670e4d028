"""The Hub: model card (golden), push with the card, pull by repo id, offline, private repos, and failures.

Everything that talks to a Hub runs the real ``huggingface_hub`` client against ``tests/hub_server.py`` over
loopback. ``huggingface_hub`` reads ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` / ``HF_HOME`` when it is imported, so
the transformers / PEFT entry points (``push_to_hub``, ``load_adapter``, ``PeftModel.from_pretrained``) run in
fresh subprocesses with those set; ``impart_peft.hub``'s own functions take ``endpoint=`` and run in-process.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from safetensors.torch import save_file

import impart_peft
from impart_peft.hub import (
    AdapterDownloadError,
    AdapterNotCachedError,
    AdapterNotFoundError,
    NotAnImPartAdapterError,
    download_adapter,
    push_adapter,
)
from impart_peft.modelcard import build_model_card, compression_stats, read_card_inputs, write_model_card

sys.path.insert(0, str(Path(__file__).parent))
from hub_server import HubServer  # noqa: E402

DATA = Path(__file__).parent / "data"
TOKEN = "hf_write_alice"
VERSIONS = {"impart-peft": "0.1.0", "peft": "0.21.2", "transformers": "5.23.0", "torch": "2.13.0"}
REPO = "org/math-impart"
BASE_REPO = "org/tiny-llama-base"
PRIVATE_REPO = "org/private-impart"
CLI_REPO = "org/cli-compressed"
CLI_PUSH_REPO = "org/cli-pushed"


# ---------------------------------------------------------------------------------------------------- card
def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def _golden_card() -> str:
    config = json.loads((DATA / "hub_card_adapter_config.json").read_text())
    return build_model_card(
        config,
        adapter_bytes=612,
        repo_id="org/tiny-llama-math-impart",
        finetuned_num_parameters=1_184,
        tags=["math", "reasoning", "math"],
        license="llama2",
        command="impart compress org/tiny-llama org/tiny-llama-math out --ratio 16 --seed 0",
        versions=VERSIONS,
    )


def test_model_card_golden():
    got = _golden_card()
    if (
        os.environ.get("IMPART_UPDATE_GOLDEN") == "1"
    ):  # regenerate after a deliberate change, then review the diff
        (DATA / "hub_card_expected.md").write_text(got)
    assert got == (DATA / "hub_card_expected.md").read_text()


def test_model_card_metadata_follows_hub_conventions():
    text = _golden_card()
    meta = _front_matter(text)
    assert meta == {
        "base_model": "org/tiny-llama",
        "library_name": "peft",
        "license": "llama2",
        "pipeline_tag": "text-generation",
        "tags": [
            "impart",
            "delta-compression",
            "base_model:adapter:org/tiny-llama",
            "math",
            "reasoning",
        ],
    }
    card = ModelCard(text)  # huggingface_hub's own parser of the metadata
    assert card.data.base_model == "org/tiny-llama"
    assert card.data.library_name == "peft"
    # The load snippets name the repo and the base exactly, after `import impart_peft`.
    assert 'model = AutoModelForCausalLM.from_pretrained("org/tiny-llama")\nmodel.load_adapter(' in text
    assert 'model.load_adapter("org/tiny-llama-math-impart")' in text
    assert 'PeftModel.from_pretrained(base, "org/tiny-llama-math-impart")' in text
    assert text.index("import impart_peft") < text.index("load_adapter(")
    assert read_card_inputs(text) == {
        "command": "impart compress org/tiny-llama org/tiny-llama-math out --ratio 16 --seed 0",
        "finetuned_num_parameters": 1_184,
        "license": "llama2",
        "tags": ["math", "reasoning"],
    }


def test_model_card_numbers_from_config():
    config = json.loads((DATA / "hub_card_adapter_config.json").read_text())
    stats = compression_stats(config, adapter_bytes=1000, finetuned_num_parameters=500)
    # By hand from the fixture: q_proj 8x16 (u 6 + v 6, bias 8), embed 32x8 (u 8 + v 4), lm_head tied, norm 16.
    assert stats.dense_matrix_values == 8 * 16 + 32 * 8
    assert stats.stored_factor_values == 6 + 6 + 8 + 4
    assert stats.dense_vector_values == 16 + 8
    assert (stats.matrices, stats.tied, stats.vectors, stats.kept_pairs) == (2, 1, 2, 3 + 2)
    assert stats.reference_dtype == "bfloat16"
    assert stats.dense_bytes == 2 * (8 * 16 + 32 * 8 + 16 + 8)
    assert stats.values_ratio == pytest.approx(16.0)
    assert stats.disk_ratio == pytest.approx(stats.dense_bytes / 1000)
    assert stats.finetuned_bytes == 1000 and stats.finetune_ratio == pytest.approx(1.0)


def test_model_card_when_little_is_known():
    config = json.loads((DATA / "hub_card_adapter_config.json").read_text())
    config.update(
        compression_ratio=None,
        base_model_name_or_path="/data/models/llama",
        task_type=None,
        auto_mapping=None,
    )
    text = build_model_card(config, adapter_bytes=10, versions=VERSIONS)
    meta = _front_matter(text)
    # A local path is not a Hub id: no base_model metadata; no license, no pipeline tag when unknown.
    assert meta == {"library_name": "peft", "tags": ["impart", "delta-compression"]}
    assert "none (lossless)" in text and "float rounding" in text
    assert "AutoModel.from_pretrained" in text and 'load_adapter("path/to/this/adapter")' in text
    assert "| Size of the fine-tune (bfloat16) | unknown |" in text
    assert "config = ImPartConfig(compression_ratio=None, pre_prune_ratio=0.8" in text
    with pytest.raises(ValueError, match="peft_type"):
        build_model_card({**config, "peft_type": "LORA"}, adapter_bytes=1, versions=VERSIONS)


def _tiny_pair():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base = LlamaForCausalLM(cfg).eval()
    ft = LlamaForCausalLM(cfg)
    ft.load_state_dict(base.state_dict())
    opt = torch.optim.AdamW(ft.parameters(), lr=1e-2)
    x = torch.randint(0, 128, (4, 16))
    for _ in range(3):
        ft(x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    return base, ft.eval()


def test_save_pretrained_writes_the_impart_card(tmp_path):
    base, ft = _tiny_pair()
    ft_params = sum(p.numel() for p in ft.parameters())
    ft_state = ft.state_dict()
    changed = sum(v.numel() for k, v in base.state_dict().items() if not torch.equal(v, ft_state[k]))
    model = impart_peft.from_finetuned(base, ft, impart_peft.ImPartConfig(compression_ratio=4))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    meta = _front_matter(text)
    assert meta["tags"][:2] == ["impart", "delta-compression"] and meta["library_name"] == "peft"
    assert "More Information Needed" not in text  # PEFT's template is replaced, not appended to
    adapter_bytes = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert (
        f"| Size of the adapter (adapter_model.safetensors) | {adapter_bytes / 1e3:.2f} kB ({adapter_bytes:,} bytes) |"
        in text
    )
    # Every parameter of the tiny fine-tune changed: the dense delta is the whole model (float32).
    assert changed == ft_params
    assert f"({4 * ft_params:,} bytes)" in text.split("Size of the fine-tune")[1].split("\n")[0]
    assert f"({4 * changed:,} bytes)" in text.split("Size of the dense delta")[1].split("\n")[0]
    # Inputs recorded by an earlier card survive a new save (PEFT rewrites README.md in between).
    write_model_card(tmp_path, license="apache-2.0", tags=["math"], command="impart compress b f out")
    model.save_pretrained(tmp_path)
    again = (tmp_path / "README.md").read_text()
    assert _front_matter(again)["license"] == "apache-2.0" and "math" in _front_matter(again)["tags"]
    assert "impart compress b f out" in again


def test_save_pretrained_leaves_other_adapters_alone(tmp_path):
    from peft import LoraConfig, get_peft_model

    base, _ = _tiny_pair()
    lora = get_peft_model(base, LoraConfig(target_modules=["q_proj"], r=2))
    lora.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "impart" not in text and "More Information Needed" in text  # PEFT's own card


# ---------------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def hub():
    with HubServer(tokens={TOKEN: "alice"}, orgs={"alice": ["org"]}) as server:
        yield server


def _env(hub: HubServer, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home),
        HF_HUB_DISABLE_XET="1",  # the test server speaks LFS, not Xet
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
    )
    env.update(extra)
    return env


def _run(code: str, env: dict[str, str], cwd: Path, *args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"subprocess failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


_PUSH = """
import copy, json, torch, impart_peft
from impart_peft import ImPartConfig
from transformers import LlamaConfig, LlamaForCausalLM

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
base = LlamaForCausalLM(cfg).eval()
ft = LlamaForCausalLM(cfg)
ft.load_state_dict(base.state_dict())
opt = torch.optim.AdamW(ft.parameters(), lr=1e-2)
x = torch.randint(0, 128, (4, 16))
for _ in range(3):
    ft(x, labels=x).loss.backward(); opt.step(); opt.zero_grad()
ft.eval()
ft.name_or_path = "org/tiny-llama-math"
base.push_to_hub("{base_repo}")  # transformers' own push of the base model
ids = torch.randint(0, 128, (2, 12))

hub_base = LlamaForCausalLM.from_pretrained("{base_repo}").eval()  # so the adapters record the base's Hub id
main = impart_peft.from_finetuned(copy.deepcopy(hub_base), ft, ImPartConfig(compression_ratio=4, seed=0))
v2 = impart_peft.from_finetuned(copy.deepcopy(hub_base), ft, ImPartConfig(compression_ratio=4, seed=1))
with torch.no_grad():
    expected = {{"ids": ids, "main": main(ids).logits, "v2": v2(ids).logits}}
info = main.push_to_hub("{repo}", tags=["math"], license="apache-2.0")
info_v2 = v2.push_to_hub("{repo}", revision="v2")
main.save_pretrained("saved_main")
impart_peft.push_adapter("saved_main", "{private}", private=True)
# The command line: compress two checkpoint folders and push, and push a saved folder.
from impart_peft.cli import main as impart
base.save_pretrained("base_dir")
ft.save_pretrained("ft_dir")
assert impart(["compress", "base_dir", "ft_dir", "cli_out", "--ratio", "4", "--quiet", "--push-to-hub", "{cli_repo}"]) == 0
assert impart(["push", "saved_main", "{cli_push}", "--tag", "math", "--license", "mit", "--private"]) == 0
torch.save(expected, "expected.pt")
json.dump({{"main": info.oid, "v2": info_v2.oid}}, open("commits.json", "w"))
"""

_PULL = """
import copy, json, sys, torch, impart_peft
from peft import PeftModel
from transformers import LlamaForCausalLM

token, exp = sys.argv[1], torch.load("expected.pt")
commits = json.load(open("commits.json"))
got, errors = {{}}, {{}}
hub_base = LlamaForCausalLM.from_pretrained("{base_repo}").eval()  # the base, from the Hub too

def base():
    return copy.deepcopy(hub_base)

def logits(model):
    with torch.no_grad():
        return model(exp["ids"]).logits

m = base(); m.load_adapter("{repo}"); got["load_adapter"] = logits(m)
m = base(); m.load_adapter("{repo}", revision="v2"); got["load_adapter_v2"] = logits(m)
got["peft"] = logits(PeftModel.from_pretrained(base(), "{repo}"))
got["peft_commit"] = logits(PeftModel.from_pretrained(base(), "{repo}", revision=commits["main"]))
got["peft_v2"] = logits(PeftModel.from_pretrained(base(), "{repo}", revision="v2"))
try:
    base().load_adapter("{private}")
except Exception as error:
    errors["private_no_token"] = type(error).__name__
m = base(); m.load_adapter("{private}", token=token); got["private"] = logits(m)
m = base(); m.load_adapter("{cli_repo}"); got["cli_compressed"] = logits(m)
got["private_peft"] = logits(PeftModel.from_pretrained(base(), "{private}", token=token))
torch.save(got, "got.pt")
json.dump(errors, open("errors.json", "w"))
"""

_OFFLINE = """
import copy, json, sys, torch, impart_peft
from peft import PeftModel
from transformers import LlamaForCausalLM
from impart_peft.hub import AdapterNotCachedError

failed_cache, exp = sys.argv[1], torch.load("expected.pt")
got, errors = {{}}, {{}}
cached_base = LlamaForCausalLM.from_pretrained("{base_repo}").eval()  # from the cache of the pull

def base():
    return copy.deepcopy(cached_base)

def logits(model):
    with torch.no_grad():
        return model(exp["ids"]).logits

m = base(); m.load_adapter("{repo}"); got["load_adapter"] = logits(m)
m = base(); m.load_adapter("{repo}", revision="v2"); got["load_adapter_v2"] = logits(m)
got["peft"] = logits(PeftModel.from_pretrained(base(), "{repo}"))
folder = impart_peft.download_adapter("{repo}")
got["download_adapter"] = logits(PeftModel.from_pretrained(base(), folder))
# The cache of a pull that broke part-way holds adapter_config.json but no weights: nothing loads from it.
for name, load in [
    ("peft", lambda: PeftModel.from_pretrained(base(), "{repo}", cache_dir=failed_cache)),
    ("load_adapter", lambda: base().load_adapter("{repo}", cache_dir=failed_cache)),
    ("download_adapter", lambda: impart_peft.download_adapter("{repo}", cache_dir=failed_cache)),
]:
    try:
        load()
        errors[name] = None
    except AdapterNotCachedError as error:
        errors[name] = "AdapterNotCachedError: " + str(error)
    except Exception as error:
        errors[name] = type(error).__name__
torch.save(got, "got_offline.pt")
json.dump(errors, open("errors_offline.json", "w"))
"""


def _code(template: str) -> str:
    return template.format(
        repo=REPO, base_repo=BASE_REPO, private=PRIVATE_REPO, cli_repo=CLI_REPO, cli_push=CLI_PUSH_REPO
    )


@pytest.fixture(scope="module")
def pushed(hub, tmp_path_factory):
    """Subprocess A: builds a tiny llama pair, pushes the base, two ImPart adapters (main, v2) and a private one."""
    work = tmp_path_factory.mktemp("hub_work")
    _run(_code(_PUSH), _env(hub, work / "home_push", HF_TOKEN=TOKEN), work)
    return work


@pytest.fixture(scope="module")
def pulled(hub, pushed):
    """Subprocess B: a fresh process with an empty cache and no token pulls everything back."""
    _run(_code(_PULL), _env(hub, pushed / "home_pull"), pushed, TOKEN)
    return torch.load(pushed / "got.pt"), json.loads((pushed / "errors.json").read_text())


def test_push_uploads_adapter_and_card(hub, pushed):
    commits = json.loads((pushed / "commits.json").read_text())
    assert hub.head(REPO) == commits["main"] and hub.head(REPO, "v2") == commits["v2"]
    saved = pushed / "saved_main"
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert hub.file(REPO, name).content == (saved / name).read_bytes(), name
    assert hub.file(REPO, "adapter_model.safetensors").lfs  # weights went through the LFS batch API
    card = hub.file(REPO, "README.md").content.decode()
    meta = _front_matter(card)
    assert meta["base_model"] == BASE_REPO and meta["license"] == "apache-2.0"
    assert meta["tags"] == ["impart", "delta-compression", f"base_model:adapter:{BASE_REPO}", "math"]
    assert f'model.load_adapter("{REPO}")' in card and f'from_pretrained("{BASE_REPO}")' in card
    assert "`org/tiny-llama-math`" in card  # the fine-tune it came from
    assert "seed=1" in hub.file(REPO, "README.md", "v2").content.decode()
    assert hub.repos[PRIVATE_REPO].private
    assert f'load_adapter("{PRIVATE_REPO}")' in hub.file(PRIVATE_REPO, "README.md").content.decode()


def test_cli_compress_push_to_hub_and_push(hub, pushed):
    card = hub.file(CLI_REPO, "README.md").content.decode()
    assert (
        "impart compress base_dir ft_dir cli_out --ratio 4 --quiet --push-to-hub org/cli-compressed" in card
    )
    assert "base_model" not in _front_matter(card)  # compressed from a local folder: no Hub id to link
    ft_params = read_card_inputs(card)["finetuned_num_parameters"]
    assert (
        ft_params
        == read_card_inputs(hub.file(REPO, "README.md").content.decode())["finetuned_num_parameters"]
    )
    assert "generation_config.json" in hub.repos[CLI_REPO].resolve("main").files  # the fine-tune's side files
    pushed_card = hub.file(CLI_PUSH_REPO, "README.md").content.decode()
    meta = _front_matter(pushed_card)
    assert meta["license"] == "mit" and meta["tags"][-1] == "math" and hub.repos[CLI_PUSH_REPO].private
    assert f'model.load_adapter("{CLI_PUSH_REPO}")' in pushed_card
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert hub.file(CLI_PUSH_REPO, name).content == (pushed / "saved_main" / name).read_bytes()


def test_pull_in_fresh_process_is_bit_identical(pulled, pushed):
    got, errors = pulled
    expected = torch.load(pushed / "expected.pt")
    assert not torch.equal(expected["main"], expected["v2"])  # the two revisions differ (mask seed)
    for key, want in [
        ("load_adapter", "main"),
        ("peft", "main"),
        ("peft_commit", "main"),
        ("load_adapter_v2", "v2"),
        ("peft_v2", "v2"),
        ("private", "main"),
        ("private_peft", "main"),
        ("cli_compressed", "main"),  # `impart compress` writes the bytes from_finetuned does
    ]:
        assert torch.equal(got[key], expected[want]), key
    # Without a token the private repo is not there (the server enforces it).
    assert errors["private_no_token"] in ("OSError", "RepositoryNotFoundError", "ValueError")


@pytest.fixture(scope="module")
def failed_cache(hub, pushed, tmp_path_factory):
    """A cache filled by a pull whose weights download broke part-way (and the error it raised)."""
    cache = tmp_path_factory.mktemp("failed_cache")
    size = len(hub.file(REPO, "adapter_model.safetensors").content)
    hub.fail_downloads("adapter_model.safetensors", after_bytes=size // 2)
    try:
        with pytest.raises(AdapterDownloadError) as info:
            download_adapter(REPO, cache_dir=cache, endpoint=hub.url, token=False, local_files_only=False)
    finally:
        hub.clear_failures()
    # A frozen copy for the offline test (test_network_failure_... completes `cache` afterwards).
    frozen = tmp_path_factory.mktemp("failed_cache_frozen") / "hub"
    shutil.copytree(cache, frozen, symlinks=True)
    return cache, info.value, frozen


def test_network_failure_part_way_leaves_nothing_that_looks_complete(hub, failed_cache):
    cache, error, _ = failed_cache
    assert "part-way" in str(error) and "run the same call again" in str(error)
    sha = hub.file(REPO, "adapter_model.safetensors").sha256
    storage = cache / "models--org--math-impart"
    assert (storage / "blobs").is_dir()
    assert not (storage / "blobs" / sha).exists()
    assert not glob.glob(str(storage / "**" / "*.incomplete"), recursive=True)
    assert not glob.glob(str(storage / "snapshots" / "*" / "adapter_model.safetensors"))
    with pytest.raises(AdapterNotCachedError, match="not in the local cache"):
        download_adapter(REPO, cache_dir=cache, endpoint=hub.url, token=False, local_files_only=True)
    # Once the network is back, the same call completes the cache.
    folder = download_adapter(REPO, cache_dir=cache, endpoint=hub.url, token=False, local_files_only=False)
    data = Path(folder, "adapter_model.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == sha


def test_connection_dropped_once_resumes_to_the_same_bytes(hub, pushed, tmp_path):
    stored = hub.file(REPO, "adapter_model.safetensors")
    hub.fail_downloads("adapter_model.safetensors", after_bytes=len(stored.content) // 3, times=1)
    before = len(hub.log)
    try:
        folder = download_adapter(
            REPO, cache_dir=tmp_path, endpoint=hub.url, token=False, local_files_only=False
        )
    finally:
        hub.clear_failures()
    assert Path(folder, "adapter_model.safetensors").read_bytes() == stored.content
    statuses = [status for method, path, status in hub.log[before:] if "/_cdn/" in path and method == "GET"]
    # Dropped mid-body, then fetched again (with a Range request when a chunk had reached the disk).
    assert statuses[0] == -1 and statuses[1:] in ([200], [206])


def test_offline_from_the_cache_of_the_pull(hub, pulled, pushed, failed_cache):
    _, _, failed = failed_cache
    requests = len(hub.log)
    env = _env(hub, pushed / "home_pull", HF_HUB_OFFLINE="1", HF_ENDPOINT="http://127.0.0.1:9")
    _run(_code(_OFFLINE), env, pushed, str(failed))
    assert len(hub.log) == requests  # offline means offline
    got = torch.load(pushed / "got_offline.pt")
    expected = torch.load(pushed / "expected.pt")
    for key, want in [
        ("load_adapter", "main"),
        ("load_adapter_v2", "v2"),
        ("peft", "main"),
        ("download_adapter", "main"),
    ]:
        assert torch.equal(got[key], expected[want]), key
    errors = json.loads((pushed / "errors_offline.json").read_text())
    assert errors["peft"] is not None and errors["load_adapter"] is not None
    assert (
        errors["download_adapter"].startswith("AdapterNotCachedError")
        and "HF_HUB_OFFLINE" in errors["download_adapter"]
    )


# ---------------------------------------------------------------------------------------------------- errors
def test_repo_that_does_not_exist(hub, tmp_path):
    with pytest.raises(AdapterNotFoundError, match=r"'org/nope' does not exist, or it is private") as info:
        download_adapter(
            "org/nope", cache_dir=tmp_path, endpoint=hub.url, token=False, local_files_only=False
        )
    assert "token=" in str(info.value)
    with pytest.raises(AdapterNotFoundError, match="no revision 'nope'"):
        download_adapter(REPO, revision="nope", cache_dir=tmp_path, endpoint=hub.url, token=False)


def test_private_repo_needs_the_token(hub, pushed, tmp_path):
    with pytest.raises(AdapterNotFoundError, match="private"):
        download_adapter(
            PRIVATE_REPO, cache_dir=tmp_path, endpoint=hub.url, token=False, local_files_only=False
        )
    folder = download_adapter(
        PRIVATE_REPO, cache_dir=tmp_path, endpoint=hub.url, token=TOKEN, local_files_only=False
    )
    assert (
        Path(folder, "adapter_model.safetensors").read_bytes()
        == (pushed / "saved_main" / "adapter_model.safetensors").read_bytes()
    )


def test_repo_that_is_not_an_impart_adapter(hub, tmp_path):
    lora_config = {
        "peft_type": "LORA",
        "r": 8,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": "x/y",
    }
    weights = tmp_path / "w.safetensors"
    save_file({"base_model.model.q.lora_A.weight": torch.zeros(8, 4)}, str(weights))
    hub.seed_repo(
        "org/a-lora",
        {
            "adapter_config.json": json.dumps(lora_config).encode(),
            "adapter_model.safetensors": weights.read_bytes(),
        },
    )
    hub.seed_repo("org/a-model", {"config.json": b"{}", "model.safetensors": weights.read_bytes()})
    with pytest.raises(NotAnImPartAdapterError, match="is a LORA adapter, not an ImPart adapter"):
        download_adapter(
            "org/a-lora", cache_dir=tmp_path / "c", endpoint=hub.url, token=False, local_files_only=False
        )
    with pytest.raises(NotAnImPartAdapterError, match="has no adapter_config.json: it is not a PEFT adapter"):
        download_adapter(
            "org/a-model", cache_dir=tmp_path / "c", endpoint=hub.url, token=False, local_files_only=False
        )


def test_corrupt_cache_entry_is_refused(hub, pushed, tmp_path):
    folder = download_adapter(REPO, cache_dir=tmp_path, endpoint=hub.url, token=False, local_files_only=False)
    blob = os.path.realpath(os.path.join(folder, "adapter_model.safetensors"))
    data = Path(blob).read_bytes()
    os.chmod(blob, 0o644)
    Path(blob).write_bytes(data[:-10])  # a truncated blob under the right name
    with pytest.raises(AdapterDownloadError, match="corrupt .* force_download=True"):
        download_adapter(REPO, cache_dir=tmp_path, endpoint=hub.url, token=False, local_files_only=True)
    Path(blob).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # right size, wrong bytes
    with pytest.raises(AdapterDownloadError, match="sha256"):
        download_adapter(REPO, cache_dir=tmp_path, endpoint=hub.url, token=False, local_files_only=True)
    fixed = download_adapter(REPO, cache_dir=tmp_path, endpoint=hub.url, token=False, force_download=True)
    assert Path(fixed, "adapter_model.safetensors").read_bytes() == data


def test_push_refuses_what_is_not_an_impart_adapter(hub, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(NotAnImPartAdapterError, match="LORA"):
        push_adapter(tmp_path, "org/x", token=TOKEN, endpoint=hub.url)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotAnImPartAdapterError, match="has no adapter_config.json"):
        push_adapter(empty, "org/x", token=TOKEN, endpoint=hub.url)
    assert "org/x" not in hub.repos


def test_push_without_write_access(hub, pushed, tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(pushed / "saved_main", folder)
    hub_regular = HubServer(
        tokens={TOKEN: "alice"}, lfs_patterns=()
    ).start()  # no LFS: Xet-capable clients too
    try:
        with pytest.raises(AdapterNotFoundError, match="refused"):
            push_adapter(folder, "someone-else/x", token=TOKEN, endpoint=hub_regular.url)
        info = push_adapter(folder, "org/x", token=TOKEN, endpoint=hub_regular.url, tags=["code"])
        assert hub_regular.head("org/x") == info.oid
        assert "code" in _front_matter(hub_regular.file("org/x", "README.md").content.decode())["tags"]
        assert not (folder / "README.md").read_text().count("org/x")  # the folder itself is not modified
    finally:
        hub_regular.stop()


def test_push_when_the_hub_cannot_be_reached(pushed):
    with socket.socket() as sock:  # a port where nothing listens
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(AdapterDownloadError, match="the Hub cannot be reached"):
        push_adapter(pushed / "saved_main", "org/x", token=TOKEN, endpoint=dead)
