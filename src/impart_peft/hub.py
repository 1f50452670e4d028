"""The Hub: push ImPart adapters with their model card, pull them by repo id.

Push:

* :func:`push_adapter` uploads a saved adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)
  with a generated model card (``README.md``, :mod:`impart_peft.modelcard`) in one commit.
* ``PeftModel.push_to_hub("org/name")`` does the same for a model holding an ImPart adapter, and
  ``PeftModel.save_pretrained(folder)`` writes the ImPart card instead of PEFT's generic template.

  How: PEFT 0.21 has no hook for a tuner to supply its card, and transformers' ``push_to_hub`` (which
  ``PeftModel`` inherits) overwrites whatever ``README.md`` ``save_pretrained`` wrote with a generic card
  fetched from the repo. So importing :mod:`impart_peft` wraps those two ``PeftModel`` methods: when the adapter
  saved at the folder's root (``"default"``) is an ImPart adapter, ``save_pretrained`` runs PEFT's own code and
  then writes the ImPart card over PEFT's, and ``push_to_hub`` saves to a temporary folder and calls
  :func:`push_adapter`. For every other adapter the wrappers call PEFT's methods unchanged.

Pull: ``model.load_adapter("org/name")`` and ``PeftModel.from_pretrained(base, "org/name")`` work as for any
adapter once :mod:`impart_peft` is imported (``revision=``, ``token=``, ``HF_HUB_OFFLINE=1`` from the cache).
transformers 5.23's ``load_adapter`` accepts download options only through ``adapter_kwargs`` and raises
``TypeError`` on ``revision=`` / ``token=``; importing :mod:`impart_peft` also makes those keywords work, by
moving them into ``adapter_kwargs`` (only when that transformers does not accept them itself).

:func:`download_adapter` / :func:`resolve_adapter` fetch an adapter into the cache and check it before anything
is loaded, with one clear error for each way that fails (:class:`AdapterNotFoundError`,
:class:`NotAnImPartAdapterError`, :class:`AdapterDownloadError`, :class:`AdapterNotCachedError`);
:func:`resolve_checkpoint` does the same for a full checkpoint (for ``compress_checkpoints`` with Hub ids).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import os
import struct
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

from .filenames import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDE_FILE_PATTERNS
from .modelcard import folder_card, read_card_inputs, write_model_card

__all__ = [
    "ADAPTER_FILES",
    "AdapterDownloadError",
    "AdapterNotCachedError",
    "AdapterNotFoundError",
    "HubError",
    "NotAnImPartAdapterError",
    "download_adapter",
    "install_hooks",
    "install_peft_hooks",
    "install_transformers_hooks",
    "push_adapter",
    "resolve_adapter",
    "resolve_checkpoint",
]

CONFIG_NAME = ADAPTER_CONFIG
WEIGHTS_NAME = ADAPTER_WEIGHTS
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
README_NAME = "README.md"


class HubError(Exception):
    """Base class of the errors of :mod:`impart_peft.hub`: the message says what went wrong and what to do."""


class AdapterNotFoundError(HubError, FileNotFoundError):
    """The repo (or the revision) does not exist, or is private and no valid token was given."""


class NotAnImPartAdapterError(HubError, ValueError):
    """The repo or folder exists but does not hold an ImPart adapter."""


class AdapterDownloadError(HubError, ConnectionError):
    """The Hub could not be reached, or a download broke part-way."""


class AdapterNotCachedError(HubError, FileNotFoundError):
    """Offline (``HF_HUB_OFFLINE=1`` / ``local_files_only=True``) and the adapter is not completely in the cache."""


# ---------------------------------------------------------------------------------------------------- helpers
def _endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or constants.ENDPOINT).rstrip("/")


def _check_safetensors_complete(path: str) -> dict[str, Any]:
    """The JSON header of ``path`` after checking the file holds every byte its header announces."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file ({size} bytes)")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            raise ValueError(
                f"{path} is truncated: its header announces {header_length} bytes, the file has {size}"
            )
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path} is not a safetensors file: unreadable header ({error})") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_length + end != size:
        raise ValueError(
            f"{path} is truncated or corrupt: {size} bytes, its tensors need {8 + header_length + end}"
        )
    return header


def _read_impart_config(config_path: str, where: str) -> dict[str, Any]:
    """``adapter_config.json`` as a dict, after checking it is an ImPart adapter's."""
    try:
        with open(config_path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise NotAnImPartAdapterError(
            f"{where}: adapter_config.json is not readable JSON ({error})"
        ) from None
    if not isinstance(data, dict):
        raise NotAnImPartAdapterError(f"{where}: adapter_config.json is not a JSON object")
    peft_type = str(data.get("peft_type") or "")
    if peft_type.upper() != "IMPART":
        kind = f"a {peft_type} adapter" if peft_type else "not a PEFT adapter config (no peft_type)"
        raise NotAnImPartAdapterError(
            f"{where} is {kind}, not an ImPart adapter. Load it with PEFT directly "
            "(PeftModel.from_pretrained / model.load_adapter); impart_peft is only needed for ImPart adapters."
        )
    if not data.get("module_meta"):
        raise NotAnImPartAdapterError(
            f"{where}: adapter_config.json says IMPART but has no module_meta, so it is not a compressed "
            "adapter (make one with impart_peft.from_finetuned or `impart compress`)"
        )
    return data


def _check_adapter_folder(folder: str) -> dict[str, Any]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder: pass the folder a saved adapter is in")
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise NotAnImPartAdapterError(
            f"{folder!r} has no {CONFIG_NAME}: it is not a saved adapter (save one with PeftModel.save_pretrained "
            "or `impart compress`)"
        )
    data = _read_impart_config(config_path, repr(folder))
    weights = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise NotAnImPartAdapterError(
            f"{folder!r} has {CONFIG_NAME} but no {WEIGHTS_NAME}: save the adapter again"
        )
    try:
        _check_safetensors_complete(weights)
    except ValueError as error:
        raise NotAnImPartAdapterError(f"{error}: save the adapter again") from None
    return data


# ---------------------------------------------------------------------------------------------------- push
def _side_files(folder: str) -> list[str]:
    """Tokenizer and generation files at the root of ``folder`` (the names ``impart compress`` copies there)."""
    names = set()
    for pattern in SIDE_FILE_PATTERNS:
        names.update(
            os.path.basename(p)
            for p in glob.glob(os.path.join(glob.escape(folder), pattern))
            if os.path.isfile(p)
        )
    return sorted(names)


def push_adapter(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
    create_pr: bool = False,
    tags: Sequence[str] | None = None,
    license: str | None = None,
    command: str | None = None,
    finetuned_num_parameters: int | None = None,
    endpoint: str | None = None,
):
    """Upload the ImPart adapter saved in ``folder`` to the Hub repo ``repo_id``, with its model card.

    One commit holds ``adapter_config.json``, ``adapter_model.safetensors``, the tokenizer and generation files
    found next to them (``impart compress`` copies the fine-tune's), the same two adapter files of any other
    adapter saved in a sub-folder, and a ``README.md`` generated by :func:`impart_peft.modelcard.build_model_card`
    for ``repo_id``. ``folder`` itself is not modified. What an earlier card in ``folder`` recorded (tags,
    license, command, size of the fine-tune) is kept; the arguments given here add to it or override it.

    Args:
        folder: a folder written by ``PeftModel.save_pretrained`` or ``impart compress``.
        repo_id: ``"namespace/name"``; the repo is created if needed.
        token: a Hub token with write access (default: the logged-in one, ``HF_TOKEN``).
        private: visibility of a repo created by this call (an existing repo keeps its own).
        revision: branch to push to (created from ``main`` if needed); default ``main``.
        commit_message / commit_description / create_pr: as in ``HfApi.create_commit``.
        tags: task tags for the card (``["math"]``), after ``impart`` and ``delta-compression``.
        license: license of the fine-tune, for the card's metadata (``"apache-2.0"``).
        command: the command that made the adapter, for the card.
        finetuned_num_parameters: parameters of the fine-tuned model, for the card's size table.
        endpoint: Hub endpoint (default ``HF_ENDPOINT``).

    Returns:
        The ``huggingface_hub.CommitInfo`` of the commit (``.oid``, ``.commit_url``).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = os.fspath(folder)
    data = _check_adapter_folder(folder)
    card = folder_card(
        folder,
        data,
        repo_id=repo_id,
        finetuned_num_parameters=finetuned_num_parameters,
        tags=tags,
        license=license,
        command=command,
    )
    operations = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name))
        for name in ADAPTER_FILES
    ]
    # The fine-tune's tokenizer / generation files, which `impart compress` copies next to the adapter.
    for name in _side_files(folder):
        operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(folder, name)))
    for entry in sorted(os.listdir(folder)):  # other adapters of the same model, saved by PEFT in sub-folders
        sub = os.path.join(folder, entry)
        if os.path.isdir(sub) and all(os.path.isfile(os.path.join(sub, name)) for name in ADAPTER_FILES):
            operations += [
                CommitOperationAdd(path_in_repo=f"{entry}/{name}", path_or_fileobj=os.path.join(sub, name))
                for name in ADAPTER_FILES
            ]
    operations.append(CommitOperationAdd(path_in_repo=README_NAME, path_or_fileobj=card.encode("utf-8")))
    ratio = data.get("compression_ratio")
    message = commit_message or (
        "Upload ImPart adapter ("
        + ("lossless" if ratio is None else f"compression ratio {float(ratio):g}")
        + ")"
    )

    api = HfApi(endpoint=endpoint, token=token)
    action = f"push to {repo_id!r} at {_endpoint(endpoint)}"
    with _hub_errors(action, repo_id, write=True):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.create_commit(
            repo_id,
            operations=operations,
            commit_message=message,
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )


# ---------------------------------------------------------------------------------------------------- pull
@contextlib.contextmanager
def _hub_errors(action: str, repo_id: str, write: bool = False, revision: str | None = None):
    """Turn huggingface_hub / transport errors into one clear :class:`HubError` each."""
    try:  # the HTTP client huggingface_hub 2.x uses
        from httpx2 import ConnectError, TransportError
    except ImportError:  # pragma: no cover - another huggingface_hub: plain OSErrors only
        ConnectError = TransportError = OSError  # noqa: N806
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except HubError:
        raise
    except GatedRepoError as error:
        raise AdapterNotFoundError(
            f"Could not {action}: {repo_id!r} is gated; accept its conditions on the Hub and pass token=..."
        ) from error
    except RepositoryNotFoundError as error:
        raise AdapterNotFoundError(
            f"Could not {action}: the repo {repo_id!r} does not exist, or it is private and no valid token was "
            "given. Check the id, and pass token=... (or run `hf auth login`) for a private repo."
        ) from error
    except RevisionNotFoundError as error:
        raise AdapterNotFoundError(
            f"Could not {action}: {repo_id!r} has no revision {revision!r} (a branch, tag or commit id)"
        ) from error
    except RemoteEntryNotFoundError:
        raise  # callers say which file is missing
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status in (401, 403):
            need = "write access to it (a token with the 'write' role)" if write else "access to it"
            raise AdapterNotFoundError(
                f"Could not {action}: the Hub refused ({status}): pass token=... with {need}, or run `hf auth login`"
            ) from error
        raise AdapterDownloadError(
            f"Could not {action}: the Hub answered {status} ({error}). Try again later."
        ) from error
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        raise
    except (TransportError, OSError) as error:
        if isinstance(error, FileNotFoundError | PermissionError | IsADirectoryError):
            raise
        if isinstance(error, ConnectError):
            raise AdapterDownloadError(
                f"Could not {action}: the Hub cannot be reached ({error}). Check the connection (or HF_ENDPOINT) "
                "and try again."
            ) from error
        raise AdapterDownloadError(
            f"Could not {action}: the connection failed part-way ({type(error).__name__}: {error}). Nothing "
            "partial was kept; run the same call again."
        ) from error


def download_adapter(
    repo_id: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    force_download: bool = False,
    endpoint: str | None = None,
) -> str:
    """Fetch the ImPart adapter ``repo_id`` into the Hub cache and check it; returns its local folder.

    ``adapter_config.json`` is fetched first and checked (an ImPart adapter?), then ``adapter_model.safetensors``
    from the same commit, which is checked to hold every byte its header announces and, for a file stored in
    LFS, to have the sha256 the Hub announced. The folder returned is the cache snapshot of that commit, and
    ``PeftModel.from_pretrained(base, folder)`` / ``model.load_adapter(folder)`` load it.

    Args:
        repo_id: ``"namespace/name"``.
        revision: a branch, tag or commit id (default ``main``).
        token: for a private or gated repo.
        cache_dir: the Hub cache (default ``HF_HUB_CACHE``).
        local_files_only: use only the cache (default: ``True`` when ``HF_HUB_OFFLINE=1``).
        force_download: fetch again even when cached.
        endpoint: Hub endpoint (default ``HF_ENDPOINT``).

    Raises:
        AdapterNotFoundError: no such repo / revision, or private without a valid token.
        NotAnImPartAdapterError: the repo holds no ``adapter_config.json``, another PEFT method's adapter, or no
            weights.
        AdapterDownloadError: the Hub could not be reached, or a download broke part-way.
        AdapterNotCachedError: offline and the adapter is not completely in the cache.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled, RemoteEntryNotFoundError

    if local_files_only is None:
        local_files_only = constants.HF_HUB_OFFLINE
    where = repr(repo_id) + (f" (revision {revision!r})" if revision else "")
    common = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only, endpoint=endpoint)

    def fetch(filename: str, rev: str | None) -> str:
        try:
            with _hub_errors(
                f"download {filename} of {where} from {_endpoint(endpoint)}", repo_id, revision=rev
            ):
                return hf_hub_download(
                    repo_id, filename, revision=rev, force_download=force_download, **common
                )
        except RemoteEntryNotFoundError:
            if filename == CONFIG_NAME:
                raise NotAnImPartAdapterError(
                    f"{where} has no {CONFIG_NAME}: it is not a PEFT adapter. An ImPart adapter repo holds "
                    f"{CONFIG_NAME} and {WEIGHTS_NAME} (push one with impart_peft.hub.push_adapter); a full model "
                    "loads with from_pretrained instead."
                ) from None
            raise NotAnImPartAdapterError(
                f"{where} has {CONFIG_NAME} but no {WEIGHTS_NAME}: the upload is incomplete; push the adapter again"
            ) from None
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
            if local_files_only:
                raise AdapterNotCachedError(
                    f"{filename} of {where} is not in the local cache and downloads are off (HF_HUB_OFFLINE=1 or "
                    "local_files_only=True): load it once online, or pass the folder of a saved adapter"
                ) from error
            raise AdapterDownloadError(
                f"Could not download {filename} of {where}: the Hub at {_endpoint(endpoint)} cannot be reached and "
                "the file is not in the local cache. Check the connection (or HF_ENDPOINT) and try again."
            ) from error

    config_path = fetch(CONFIG_NAME, revision)
    _read_impart_config(config_path, where)
    # The snapshot folder is named after the commit: fetch the weights of that very commit.
    commit = os.path.basename(os.path.dirname(config_path))
    weights_path = fetch(WEIGHTS_NAME, commit)
    try:
        _check_safetensors_complete(weights_path)
        blob = os.path.realpath(weights_path)
        name = os.path.basename(blob)
        if len(name) == 64 and all(c in "0123456789abcdef" for c in name):  # LFS blob: named by its sha256
            digest = hashlib.sha256()
            with open(blob, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 24), b""):
                    digest.update(chunk)
            if digest.hexdigest() != name:
                raise ValueError(f"{blob} does not have the sha256 the Hub announced")
    except ValueError as error:
        raise AdapterDownloadError(
            f"The cached {WEIGHTS_NAME} of {where} is corrupt ({error}). Fetch it again with force_download=True."
        ) from None
    return os.path.dirname(weights_path)


def resolve_adapter(path_or_repo_id: str | os.PathLike, **kwargs: Any) -> str:
    """A local folder holding the ImPart adapter ``path_or_repo_id``: the folder itself (checked) or a download.

    ``kwargs`` go to :func:`download_adapter` (``revision``, ``token``, ``cache_dir``, ...).
    """
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        _check_adapter_folder(path)
        return path
    from .modelcard import is_hub_repo_id

    if not is_hub_repo_id(path):
        raise FileNotFoundError(f"{path!r} is neither a folder nor a Hub repo id (namespace/name)")
    return download_adapter(path, **kwargs)


CHECKPOINT_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.model",
    "*.txt",
    "*.tiktoken",
)


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    endpoint: str | None = None,
) -> str:
    """A local folder holding the (sharded) safetensors checkpoint ``path_or_repo_id``.

    A folder is returned as is; a Hub repo id is downloaded into the Hub cache (safetensors weights, their
    index, configs and tokenizer files; never ``*.bin`` pickles) and its snapshot folder returned.

    Raises:
        AdapterNotFoundError: no such repo / revision (or private without a token).
        AdapterDownloadError / AdapterNotCachedError: as in :func:`download_adapter`.
        ValueError: the repo holds no ``*.safetensors`` file.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        return path
    from .modelcard import is_hub_repo_id

    if not is_hub_repo_id(path):
        raise FileNotFoundError(f"{path!r} is neither a folder nor a Hub repo id (namespace/name)")
    if local_files_only is None:
        local_files_only = constants.HF_HUB_OFFLINE
    where = repr(path) + (f" (revision {revision!r})" if revision else "")
    try:
        with _hub_errors(
            f"download the checkpoint {where} from {_endpoint(endpoint)}", path, revision=revision
        ):
            folder = snapshot_download(
                path,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                allow_patterns=list(CHECKPOINT_PATTERNS),
                endpoint=endpoint,
            )
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        if local_files_only:
            raise AdapterNotCachedError(
                f"The checkpoint {where} is not (completely) in the local cache and downloads are off: download "
                "it once online, or pass a local folder"
            ) from error
        raise AdapterDownloadError(
            f"Could not download the checkpoint {where}: the Hub cannot be reached and it is not cached"
        ) from error
    if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
        raise ValueError(
            f"{where} holds no *.safetensors file: only safetensors checkpoints are read (convert a *.bin "
            "checkpoint with transformers' save_pretrained first)"
        )
    return folder


# ---------------------------------------------------------------------------------------------------- hooks
def _impart_root_config(peft_model, selected_adapters: Sequence[str] | None = None):
    """The ImPart config saved at the folder's root ("default"), or None (then PEFT's behaviour is kept)."""
    from .config import ImPartConfig

    configs = getattr(peft_model, "peft_config", None) or {}
    if selected_adapters is not None and "default" not in selected_adapters:
        return None
    config = configs.get("default")
    return config if isinstance(config, ImPartConfig) else None


def _finetuned_num_parameters(peft_model) -> int:
    """Parameters of the model without the adapter: the fine-tune's count (same architecture; tied counted once)."""
    model = peft_model.get_base_model()
    return sum(p.numel() for name, p in model.named_parameters() if "impart_" not in name)


def _wrap_save_pretrained(original):
    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, **kwargs):
        if _impart_root_config(self, kwargs.get("selected_adapters")) is None:
            return original(self, save_directory, *args, **kwargs)
        readme = os.path.join(os.fspath(save_directory), README_NAME)
        inputs: dict[str, Any] = {}
        if os.path.isfile(readme):  # what our card there recorded, before PEFT rewrites it from its template
            with open(readme, encoding="utf-8", errors="replace") as handle:
                inputs = read_card_inputs(handle.read())
        if kwargs.get("is_main_process", True):
            result = _save_atomically(original, self, os.fspath(save_directory), args, kwargs)
        else:
            result = original(self, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and os.path.isfile(
            os.path.join(os.fspath(save_directory), WEIGHTS_NAME)
        ):
            try:
                write_model_card(
                    save_directory,
                    finetuned_num_parameters=_finetuned_num_parameters(self),
                    tags=inputs.get("tags"),
                    license=inputs.get("license"),
                    command=inputs.get("command"),
                )
            except Exception as error:  # the adapter is saved; a card problem must not make the save fail
                warnings.warn(
                    f"The ImPart model card could not be written ({error}); PEFT's card was kept",
                    stacklevel=2,
                )
        return result

    save_pretrained.__impart_wrapped__ = original
    return save_pretrained


def _save_atomically(original, model, save_directory: str, args: tuple, kwargs: dict[str, Any]):
    """PEFT's ``save_pretrained`` into a hidden scratch folder beside ``save_directory``, then each file renamed into
    place (``os.replace``: a file is either the old one or the new one, never partial), the weights files last.

    A writer killed part-way leaves at worst the new config beside the old (or no) weights, which a load refuses
    (the digests do not match, or the weights are missing: :mod:`impart_peft.validation`), and a hidden
    ``.<name>.partial-*`` folder; never a half-written file taken for a finished one.
    """
    import shutil

    target = os.path.abspath(save_directory)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.partial-", dir=parent)
    try:
        result = original(model, scratch, *args, **kwargs)
        files = []
        for root, _, names in os.walk(scratch):
            files += [os.path.relpath(os.path.join(root, name), scratch) for name in names]
        # Configs and cards first, weights last: a kill in between leaves new configs that refuse the old weights.
        files.sort(key=lambda rel: (os.path.basename(rel) == WEIGHTS_NAME, rel))
        for rel in files:
            destination = os.path.join(target, rel)
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            os.replace(os.path.join(scratch, rel), destination)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _wrap_push_to_hub(original):
    @functools.wraps(original)
    def push_to_hub(self, repo_id: str, *args, **kwargs):
        if args or _impart_root_config(self) is None:
            return original(self, repo_id, *args, **kwargs)
        known = {
            "commit_message",
            "commit_description",
            "private",
            "token",
            "revision",
            "create_pr",
            "max_shard_size",
            "tags",
            "license",
            "command",
            "endpoint",
        }
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(
                f"push_to_hub() of an ImPart adapter got unexpected keyword argument(s) {unknown}"
            )
        kwargs.pop("max_shard_size", None)  # an adapter is one file
        with tempfile.TemporaryDirectory(prefix="impart-push-") as folder:
            # The base's embedding weights are no part of an ImPart adapter (its deltas are): never upload them.
            self.save_pretrained(folder, save_embedding_layers=False)
            return push_adapter(
                folder, repo_id, finetuned_num_parameters=_finetuned_num_parameters(self), **kwargs
            )

    push_to_hub.__impart_wrapped__ = original
    return push_to_hub


def _wrap_load_adapter(original, moved: frozenset[str]):
    @functools.wraps(original)
    def load_adapter(self, *args, **kwargs):
        hub_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in moved}
        if hub_kwargs:
            adapter_kwargs = dict(kwargs.pop("adapter_kwargs", None) or {})
            clash = sorted(
                k for k in hub_kwargs if k in adapter_kwargs and adapter_kwargs[k] != hub_kwargs[k]
            )
            if clash:
                raise ValueError(
                    f"load_adapter got {clash} both as keywords and in adapter_kwargs with other values"
                )
            kwargs["adapter_kwargs"] = {**adapter_kwargs, **hub_kwargs}
        return _guarded_load_adapter(original, self, args, kwargs)

    load_adapter.__impart_wrapped__ = original
    return load_adapter


def _guarded_load_adapter(original, model, args: tuple, kwargs: dict[str, Any]):
    """transformers' ``load_adapter`` behind :func:`impart_peft.validation.guarded_load` when it is given a path or
    repo id (an ``adapter_state_dict`` passed in memory goes through the config and base checks only)."""
    from .validation import guarded_load

    names = ("peft_model_id", "adapter_name", "peft_config", "adapter_state_dict")
    bound = dict(zip(names, args, strict=False))
    model_id = bound.get("peft_model_id", kwargs.get("peft_model_id"))
    in_memory = bound.get("adapter_state_dict", kwargs.get("adapter_state_dict"))
    given_config = bound.get("peft_config", kwargs.get("peft_config"))
    if model_id is None or in_memory is not None or given_config is not None:
        return original(model, *args, **kwargs)
    adapter_kwargs = dict(kwargs.get("adapter_kwargs") or {})
    hub_kwargs = {**adapter_kwargs}
    if kwargs.get("local_files_only"):
        hub_kwargs["local_files_only"] = True
    adapter_name = bound.get("adapter_name", kwargs.get("adapter_name")) or "default"

    def load(pinned: dict[str, Any]):
        call = dict(kwargs)
        if "revision" in pinned:  # the commit whose files were checked
            call["adapter_kwargs"] = {**adapter_kwargs, "revision": pinned["revision"]}
        return original(model, *args, **call)

    return guarded_load(load, model, model_id, adapter_name, adapter_kwargs.get("subfolder"), hub_kwargs)


def _wrap_from_pretrained(original):
    """``PeftModel.from_pretrained`` behind :func:`impart_peft.validation.guarded_load` (``original`` is the
    classmethod's function)."""

    @functools.wraps(original)
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        from .config import ImPartConfig
        from .validation import guarded_load

        config = kwargs.get("config", args[2] if len(args) > 2 else None)
        if config is not None and not isinstance(config, ImPartConfig):
            return original(cls, model, model_id, *args, **kwargs)
        adapter_name = kwargs.get("adapter_name", args[0] if args else "default")

        def load(pinned: dict[str, Any]):
            call = dict(kwargs)
            if "revision" in pinned:  # the commit whose files were checked
                call["revision"] = pinned["revision"]
            return original(cls, model, model_id, *args, **call)

        hub_kwargs = {k: kwargs.get(k) for k in ("revision", "token", "cache_dir")}
        return guarded_load(load, model, model_id, adapter_name, kwargs.get("subfolder"), hub_kwargs, config)

    from_pretrained.__impart_wrapped__ = original
    return classmethod(from_pretrained)


def install_peft_hooks() -> None:
    """Wrap ``PeftModel.save_pretrained`` / ``push_to_hub`` (idempotent): run when PEFT is imported."""
    from peft import PeftModel

    for name, wrap in (("save_pretrained", _wrap_save_pretrained), ("push_to_hub", _wrap_push_to_hub)):
        current = getattr(PeftModel, name)
        if not hasattr(current, "__impart_wrapped__"):
            setattr(PeftModel, name, wrap(current))
    # Loading an ImPart adapter is loading untrusted input: validated whole before PEFT injects anything.
    current = PeftModel.__dict__["from_pretrained"]
    if not hasattr(current.__func__, "__impart_wrapped__"):
        PeftModel.from_pretrained = _wrap_from_pretrained(current.__func__)


def install_transformers_hooks() -> None:
    """Wrap transformers' ``load_adapter`` so that it takes ``revision=`` / ``token=`` (idempotent; only where that
    transformers does not accept them itself): run when ``transformers.modeling_utils`` is imported."""
    try:
        from transformers.integrations.peft import PeftAdapterMixin
        from transformers.modeling_utils import LoadStateDictConfig
        from transformers.utils.hub import DownloadKwargs
    except ImportError:  # another transformers layout: leave load_adapter as it is
        return
    fields = {f.name for f in dataclasses.fields(LoadStateDictConfig)}
    moved = frozenset(
        k for k in DownloadKwargs.__annotations__ if k not in fields and k != "local_files_only"
    )
    current = PeftAdapterMixin.load_adapter
    # Always wrapped: an ImPart adapter is validated whole before transformers injects anything.
    if not hasattr(current, "__impart_wrapped__"):
        PeftAdapterMixin.load_adapter = _wrap_load_adapter(current, moved)


def install_hooks() -> None:
    """Install the ``PeftModel.save_pretrained`` / ``push_to_hub`` and ``load_adapter`` wrappers (idempotent).

    :mod:`impart_peft` installs each when its library is imported (:mod:`impart_peft._autoload`), so that importing
    impart_peft loads neither PEFT nor transformers.
    """
    install_peft_hooks()
    install_transformers_hooks()
