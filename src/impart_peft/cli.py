"""The ``impart`` command line: compress, inspect, apply and evaluate ImPart adapters.

    impart compress BASE FINETUNED OUTPUT [--ratio 16 | --size 30MB [--size-rule spectral]] [--pre-prune 0.8|auto]
                    [--exponent 1.0|auto] [--seed 0] [--device cuda]
                    [--bits 8,4,3,2 [--bit-fractions F,F,F,F] [--group-size 128]] [--push-to-hub ORG/NAME]
    impart inspect ADAPTER
    impart apply BASE ADAPTER OUTPUT
    impart merge BASE FT1 [FT2 ...] OUTPUT [--method task_arithmetic|ties] [--sparsify impart|dare|magnitude|none]
                 [--density 0.2] [--weights W1,W2,...]
    impart eval BASE FINETUNED ADAPTER [--text FILE]
    impart push ADAPTER ORG/NAME [--private] [--revision BRANCH] [--tag TAG] [--license ID]

Every command has ``--help``. Errors print one line on stderr and exit with status 1 (2 for a bad command line);
``--debug`` shows the traceback instead. The defaults of ``compress`` are read from :class:`ImPartConfig`, so the
same inputs and seed give the same adapter from Python and from the shell. See docs/cli.md.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import json
import math
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["build_parser", "main"]

# Errors whose message is the whole story; anything else also gets its type name.
_EXPECTED_ERRORS = (ValueError, OSError, KeyError, TypeError)


@functools.cache
def _config_defaults() -> dict[str, Any]:
    """ImPartConfig's defaults (read when a command's options are built: ``impart --help`` imports no PEFT)."""
    from .config import ImPartConfig

    return {
        f.name: f.default for f in dataclasses.fields(ImPartConfig) if f.default is not dataclasses.MISSING
    }


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit status 2), and whose arguments may be
    added on first use (``populate``), so that building the ``impart`` parser imports nothing heavy."""

    def __init__(
        self, *args: Any, populate: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any
    ):
        super().__init__(*args, **kwargs)
        self._populate = populate

    def _ready(self) -> None:
        if self._populate is not None:
            populate, self._populate = self._populate, None
            populate(self)

    def parse_known_args(self, args=None, namespace=None):
        self._ready()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._ready()
        return super().format_usage()

    def format_help(self) -> str:
        self._ready()
        return super().format_help()

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ----------------------------------------------------------------------------------------------- argument types
def _convert(kind: Callable[[str], Any], text: str, what: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None


def _checked(kind: Callable[[str], Any], check: Callable[[Any], None], what: str = "a number"):
    """An argparse type: ``kind(text)``, then ``check(value)``, whose ``ValueError`` message is the usage error."""

    def parse(text: str) -> Any:
        value = _convert(kind, text, what)
        try:
            check(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    return parse


def _list_of(kind: Callable[[str], Any], what: str):
    """An argparse type: a comma-separated list of ``kind``."""
    return lambda text: _convert(lambda t: [kind(part) for part in t.split(",")], text, what)


def _at_least(low: int, message: str) -> Callable[[int], None]:
    def check(value: int) -> None:
        if value < low:
            raise ValueError(message.format(value))

    return check


def _ratio(text: str) -> float | None:
    if text.strip().lower() in ("none", "lossless"):
        return None
    value = _convert(float, text, "a number (or 'none' for lossless)")
    from .allocation import check_compression_ratio

    try:
        check_compression_ratio(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be > 1, got {text}: the ratio is dense delta values / stored values (e.g. 16 for a 16x smaller "
            "delta; 'none' keeps every factor element)"
        ) from None
    return value


def _target_size(text: str) -> str:
    """``--size``: checked as ImPartConfig checks ``target_size`` (its message is the usage error)."""
    from .budget import parse_target_size

    try:
        parse_target_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text.strip()


def _or_auto(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type: ``"auto"`` (chosen per matrix from its spectrum), else ``parse(text)``."""

    def parse_or_auto(text: str) -> Any:
        if text.strip().lower() == "auto":
            return "auto"  # impart_peft.budget.AUTO (not imported here: it needs numpy)
        return parse(text)

    return parse_or_auto


def _allocation_check(name: str) -> Callable[[float], None]:
    """``impart_peft.allocation.<name>``, imported when an option is parsed (it needs torch)."""

    def check(value: float) -> None:
        from . import allocation

        getattr(allocation, name)(value)

    return check


_seed = _checked(int, _at_least(0, "the seed must be a non-negative integer, got {}"), "an integer")
_positive_int = _checked(int, _at_least(2, "must be at least 2, got {}"), "an integer")
_int_list = _list_of(int, "a comma-separated list of integers, e.g. 8,4,3,2")
_float_list = _list_of(float, "a comma-separated list of numbers")


def _quantization(args: argparse.Namespace) -> dict[str, Any] | None:
    """The ImPartConfig.quantization asked for by --bits / --bit-fractions / --group-size (None without --bits)."""
    if args.bits is None:
        if args.bit_fractions is not None or args.group_size is not None:
            raise ValueError(
                "--bit-fractions and --group-size quantise the factors: they need --bits (e.g. --bits 8,4,3,2)"
            )
        return None
    scheme: dict[str, Any] = {"bits": args.bits}
    if args.bit_fractions is not None:
        scheme["fractions"] = args.bit_fractions
    if args.group_size is not None:
        scheme["group_size"] = args.group_size
    return scheme


def _repo_id(text: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError as error:
        raise argparse.ArgumentTypeError(" ".join(str(error).split())) from None
    if "/" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: write the repo id as ORG/NAME (or USER/NAME)")
    return text


# ------------------------------------------------------------------------------------------------------ commands
def _say(args: argparse.Namespace, message: str) -> None:
    """Print ``message`` unless ``--quiet``."""
    if not args.quiet:
        print(message)


def _writing(args: argparse.Namespace) -> dict[str, Any]:
    """The options of every command that writes a folder (``_device_option`` and ``_output_options``)."""
    return {"device": args.device, "overwrite": args.overwrite, "progress": not args.quiet}


def _cmd_compress(args: argparse.Namespace) -> int:
    from .budget import BudgetTooSmallError
    from .checkpoint_compress import compress_checkpoints
    from .config import ImPartConfig
    from .inspection import inspect_adapter

    push = _push_function() if args.push_to_hub else None  # fail before hours of work, not after
    if args.size_rule is not None and args.size is None:
        raise ValueError(
            "--size-rule says how --size is spread over the matrices: it needs --size (e.g. --size 30MB)"
        )
    config = ImPartConfig(
        compression_ratio=args.ratio,
        pre_prune_ratio=args.pre_prune,
        importance_exponent=args.exponent,
        target_size=args.size,
        size_rule=args.size_rule or _config_defaults()["size_rule"],
        allocation=args.allocation,
        seed=args.seed,
        svd_dtype=args.svd_dtype,
        include_embeddings=not args.no_embeddings,
        quantization=_quantization(args),
    )
    try:
        output = compress_checkpoints(
            args.base,
            args.finetuned,
            args.output,
            config,
            command=getattr(args, "command_line", None),
            **_writing(args),
        )
    except BudgetTooSmallError as error:
        raise ValueError(
            f"--size {args.size} is too small for this fine-tune: the smallest adapter (the top singular pair of "
            f"each changed matrix kept whole, and the dense vectors) is {error.smallest} bytes "
            f"({_size(error.smallest)}); ask for --size {error.smallest} or more, or leave the embeddings out "
            "(--no-embeddings)"
        ) from error
    if not args.quiet:
        summary = inspect_adapter(output)
        per_matrix = _per_matrix(summary)
        print(
            f"wrote {output}: {len(summary.modules)} modules, {_size(summary.file_bytes)} "
            f"(the dense deltas: {_size(summary.dense_bytes)}, {_fmt_ratio(summary.disk_ratio)} smaller)"
            + (
                f"; per-matrix ratio {_matrix_ratio(per_matrix['ratio_min'])} to "
                f"{_matrix_ratio(per_matrix['ratio_max'])} (impart inspect shows each)"
                if per_matrix and per_matrix["ratio_min"] is not None
                else ""
            )
        )
    if push is not None:
        result = push(str(output), args.push_to_hub)
        _say(args, f"pushed to {args.push_to_hub}: {getattr(result, 'commit_url', result)}")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_adapter

    info = push_adapter(
        args.adapter,
        args.repo_id,
        token=args.token,
        private=True if args.private else None,
        revision=args.revision,
        commit_message=args.message,
        tags=args.tag or None,
        license=args.license,
    )
    print(f"pushed {args.adapter} to {args.repo_id}: {info.commit_url}")
    return 0


def _push_function():
    if importlib.util.find_spec("impart_peft.hub") is None:
        raise RuntimeError(
            "--push-to-hub needs impart_peft.hub.push_adapter, which this installation of impart-peft does not "
            "have: compress without --push-to-hub and upload the folder with the Hub's own tools"
        )
    push = getattr(importlib.import_module("impart_peft.hub"), "push_adapter", None)
    if push is None:
        raise RuntimeError(
            "impart_peft.hub has no push_adapter: --push-to-hub is not available in this version"
        )
    return push


def _setting(value: Any) -> str:
    """A setting of the config or of one matrix: ``auto``, ``lossless`` (a ratio of None) or the number."""
    if value is None:
        return "lossless"
    if isinstance(value, str):
        return value
    return f"{value:g}"


def _matrix_ratio(value: float | None) -> str:
    return "lossless" if value is None else f"{value:.2f}"


def _per_matrix(summary) -> dict[str, Any] | None:
    """What the modules of a planned adapter (target_size / "auto") record: the spread of their ratios, beta, C."""
    from .modelcard import per_matrix_settings

    return per_matrix_settings(summary.config.module_meta or {})


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspection import inspect_adapter

    summary = inspect_adapter(args.adapter)
    if args.json:
        print(json.dumps(_summary_dict(summary), indent=2))
        return 0
    config = summary.config
    ratio = _setting(config.compression_ratio)
    if config.target_size is not None:
        ratio = f"target size {config.target_size} (size rule {config.size_rule}), achieved ratio {ratio}"
    else:
        ratio = f"ratio {ratio}"
    print(f"adapter:    {summary.folder}")
    print(f"base:       {config.base_model_name_or_path}")
    print(f"fine-tune:  {config.finetuned_model_name_or_path}")
    print(
        f"settings:   {ratio}, pre-prune {_setting(config.pre_prune_ratio)}, "
        f"exponent {_setting(config.importance_exponent)}, allocation {config.allocation}, seed {config.seed}, "
        f"svd {config.svd_dtype}"
        + (
            f", bits {'/'.join(str(b) for b in config.quantization['bits'])} (group {config.quantization['group_size']})"
            if config.quantization
            else ""
        )
    )
    print()
    per_matrix = _per_matrix(summary)
    header = ("module", "kind", "shape", "dtype", "pairs", "stored values", "nominal CR", "disk CR")
    # Per-matrix settings (target_size / "auto"): the ratio, beta and C module_meta records for each matrix.
    rows = [header + (("ratio", "beta", "C") if per_matrix else ())]
    for m in summary.modules:
        if m.kind == "tied":
            pairs, stored = f"= {m.tied_to}", "0"
        elif m.full_rank:
            pairs, stored = f"{m.rank}/{m.full_rank}", f"{m.stored_values:,}"
        else:
            pairs, stored = "dense", f"{m.stored_values:,}"
        row = (
            m.name,
            m.kind,
            "x".join(str(d) for d in m.shape),
            m.dtype,
            pairs,
            stored,
            _fmt_ratio(m.nominal_ratio),
            _fmt_ratio(m.disk_ratio),
        )
        if per_matrix:
            if m.settings is None:
                row += ("-", "-", "-")
            else:
                row += (
                    _matrix_ratio(m.settings.get("compression_ratio")),
                    _setting(m.settings.get("pre_prune_ratio")),
                    _setting(m.settings.get("importance_exponent")),
                )
        rows.append(row)
    total = (
        f"total ({len(summary.modules)} modules)",
        "",
        "",
        "",
        "",
        f"{summary.stored_values:,}",
        _fmt_ratio(summary.nominal_ratio),
        _fmt_ratio(summary.disk_ratio),
    )
    rows.append(total + (("", "", "") if per_matrix else ()))
    _print_table(rows, right={5, 6, 7, 8, 9, 10}, total=True)
    print()
    print(
        f"{ADAPTER_FILE}: {_size(summary.file_bytes)}; the dense deltas it replaces: {_size(summary.dense_bytes)} "
        f"({_fmt_ratio(summary.disk_ratio)} on disk; nominal CR = dense matrix values / kept factor values"
        + (", in bits: codes and scales against the fine-tune's dtype)" if config.quantization else ")")
    )
    if per_matrix:
        if per_matrix["ratio_min"] is None:
            spread = "lossless"
        else:
            spread = " / ".join(
                _matrix_ratio(per_matrix[k]) for k in ("ratio_min", "ratio_median", "ratio_max")
            )

        def counted(key: str) -> str:
            return ", ".join(f"{v} x{n}" for v, n in per_matrix[key].items())

        print(
            f"per-matrix ratio min/median/max: {spread} over {per_matrix['matrices']} matrices "
            f"(beta {counted('pre_prune_ratio_counts')}; C {counted('importance_exponent_counts')})"
        )
    if summary.other_tensors:
        print(
            f"note: the file also holds {len(summary.other_tensors)} tensor(s) that are not ImPart deltas "
            f"({_size(sum(summary.other_tensors.values()))}, e.g. {next(iter(summary.other_tensors))}); "
            "an ImPart adapter does not need them (base weights saved with the adapter?)"
        )
    return 0


ADAPTER_FILE = "adapter_model.safetensors"


def _summary_dict(summary) -> dict[str, Any]:
    modules = []
    for m in summary.modules:
        row = dataclasses.asdict(m)
        row["shape"] = list(m.shape)
        row["nominal_ratio"] = m.nominal_ratio
        row["disk_ratio"] = m.disk_ratio
        modules.append(row)
    config = summary.config
    return {
        "adapter": str(summary.folder),
        "base_model_name_or_path": config.base_model_name_or_path,
        "finetuned_model_name_or_path": config.finetuned_model_name_or_path,
        "compression_ratio": config.compression_ratio,
        "pre_prune_ratio": config.pre_prune_ratio,
        "importance_exponent": config.importance_exponent,
        "target_size": config.target_size,
        "size_rule": config.size_rule if config.target_size is not None else None,
        "per_matrix": _per_matrix(summary),
        "file_bytes": summary.file_bytes,
        "dense_bytes": summary.dense_bytes,
        "stored_values": summary.stored_values,
        "nominal_ratio": summary.nominal_ratio,
        "disk_ratio": summary.disk_ratio,
        "other_tensors": summary.other_tensors,
        "modules": modules,
    }


def _wrote_model(output: Path, args: argparse.Namespace) -> int:
    _say(args, f"wrote {output}: load it with AutoModelForCausalLM.from_pretrained({str(output)!r})")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from .checkpoint_apply import apply_adapter

    output = apply_adapter(
        args.base,
        args.adapter,
        args.output,
        max_shard_size=args.max_shard_size,
        **_writing(args),
    )
    return _wrote_model(output, args)


def _cmd_merge(args: argparse.Namespace) -> int:
    from .merging import merge_finetunes

    if len(args.models) < 3:
        raise ValueError(
            f"impart merge needs BASE, at least one fine-tune and OUTPUT; got {len(args.models)} path(s)"
        )
    base, *finetunes, output = args.models
    output = merge_finetunes(
        base,
        finetunes,
        method=args.method,
        sparsify=None if args.sparsify == "none" else args.sparsify,
        weights=args.weights,
        density=args.density,
        scaling=args.scaling,
        normalize=args.normalize,
        majority_sign=args.majority_sign,
        seed=args.seed,
        pre_prune_ratio=args.pre_prune,
        importance_exponent=args.exponent,
        output_dir=output,
        max_shard_size=args.max_shard_size,
        **_writing(args),
    )
    return _wrote_model(output, args)


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import evaluate_adapter

    text = None
    if args.text is not None:
        path = Path(args.text)
        if not path.is_file():
            raise FileNotFoundError(f"the text file {args.text!r} does not exist")
        text = path.read_text(encoding="utf-8")
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    result = evaluate_adapter(
        args.base,
        args.finetuned,
        args.adapter,
        text,
        max_tokens=args.max_tokens,
        device=args.device,
        dtype=args.dtype,
    )
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return 0
    print(
        f"{result.tokens} tokens, ids from the {result.tokenizer}; KL(fine-tune || model) in nats per token"
    )
    print()
    _print_table(
        [
            ("model", "perplexity", "KL"),
            ("fine-tune", f"{result.perplexity_finetuned:.4f}", "0"),
            ("base + adapter", f"{result.perplexity_adapter:.4f}", f"{result.kl_adapter:.6f}"),
            ("base", f"{result.perplexity_base:.4f}", f"{result.kl_base:.6f}"),
        ],
        right={1, 2},
    )
    return 0


# ------------------------------------------------------------------------------------------------------- output
def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.2f}x"


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    raise AssertionError


def _print_table(rows: list[tuple[str, ...]], right: set[int], total: bool = False) -> None:
    """Rows of cells in aligned columns; a rule under the header (and above the last row if ``total``)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    rule = "  ".join("-" * w for w in widths)
    for n, row in enumerate(rows):
        if total and n == len(rows) - 1:
            print(rule)
        cells = [
            cell.rjust(w) if i in right else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        if n == 0:
            print(rule)


# ------------------------------------------------------------------------------------------------------- parser
def _debug_option(sub: argparse.ArgumentParser) -> None:
    # SUPPRESS: a --debug before the command is not overwritten by this one's default.
    sub.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show the full traceback on errors"
    )


def _positionals(sub: argparse.ArgumentParser, *names: tuple[str, str, str]) -> None:
    for dest, metavar, help_text in names:
        sub.add_argument(dest, metavar=metavar, help=help_text)


def _device_option(sub: argparse.ArgumentParser, what: str) -> None:
    sub.add_argument("--device", default=None, help=f"where to {what}: cpu (default), cuda, cuda:1, ...")


def _output_options(sub: argparse.ArgumentParser, quiet: str = "no progress bar and no summary") -> None:
    sub.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    sub.add_argument("--quiet", action="store_true", help=quiet)


def _shard_option(sub: argparse.ArgumentParser, help_text: str) -> None:
    sub.add_argument("--max-shard-size", default="5GB", help=help_text)


def _json_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _impart_options(sub: argparse.ArgumentParser, pre_prune: str, exponent: str, auto: bool = False) -> None:
    """--pre-prune and --exponent, checked and defaulted as ImPartConfig checks and defaults them (``auto``: they
    also take ``auto``, chosen per matrix from its spectrum)."""
    defaults = _config_defaults()
    beta = _checked(float, _allocation_check("check_pre_prune_ratio"))
    c = _checked(float, _allocation_check("check_importance_exponent"))
    sub.add_argument(
        "--pre-prune",
        type=_or_auto(beta) if auto else beta,
        default=defaults["pre_prune_ratio"],
        metavar="BETA|auto" if auto else "BETA",
        help=f"{pre_prune} (default: %(default)s)",
    )
    sub.add_argument(
        "--exponent",
        type=_or_auto(c) if auto else c,
        default=defaults["importance_exponent"],
        metavar="C|auto" if auto else "C",
        help=f"{exponent} (default: %(default)s)",
    )


def _compress_arguments(sub: argparse.ArgumentParser) -> None:
    defaults = _config_defaults()
    _positionals(
        sub,
        ("base", "BASE", "the base model: folder or Hub repo id"),
        ("finetuned", "FINETUNED", "the full fine-tune of BASE: folder or Hub repo id"),
        ("output", "OUTPUT", "the adapter folder to write"),
    )
    budget = sub.add_mutually_exclusive_group()
    budget.add_argument(
        "--ratio",
        type=_ratio,
        default=defaults["compression_ratio"],
        help="compression ratio of every matrix: dense delta values / stored values, > 1, or 'none' for lossless "
        "(default: %(default)s)",
    )
    budget.add_argument(
        "--size",
        type=_target_size,
        default=defaults["target_size"],
        metavar="SIZE",
        help="a cap on adapter_model.safetensors instead of --ratio: bytes with a unit, e.g. 30MB, 1.5GB, 30MiB, "
        "or a global ratio, e.g. 16x (the file at most 1/16 of the dense deltas); each matrix's ratio is "
        "planned and recorded (ImPartConfig.target_size; docs/algorithm.md section 12)",
    )
    sub.add_argument(
        "--size-rule",
        choices=("uniform", "spectral"),
        default=None,
        help="with --size: 'uniform' (one ratio for every matrix, the smallest that fits) or 'spectral' (each "
        f"matrix's ratio from its spectrum) (default: {defaults['size_rule']})",
    )
    _impart_options(
        sub,
        "fraction of the smallest singular pairs dropped whole, in [0, 1), or 'auto' (per matrix, from its "
        "spectrum)",
        "importance exponent C > 0, or 'auto' (per matrix, from its spectrum)",
        auto=True,
    )
    sub.add_argument(
        "--allocation",
        choices=("paper", "rescaled"),
        default=defaults["allocation"],
        help="allocation rule: 'paper' (the authors' code: gamma fixed, whole pairs dropped from the end) or "
        "'rescaled' (gamma re-solved; see docs/algorithm.md) (default: %(default)s)",
    )
    sub.add_argument(
        "--seed", type=_seed, default=defaults["seed"], help="seed of the masks (default: %(default)s)"
    )
    sub.add_argument(
        "--svd-dtype",
        choices=("float32", "float64"),
        default=defaults["svd_dtype"],
        help="precision of the SVD (default: %(default)s)",
    )
    sub.add_argument(
        "--no-embeddings",
        action="store_true",
        help="leave the input embeddings and the output head out (they stay the base's)",
    )
    sub.add_argument(
        "--bits",
        type=_int_list,
        default=None,
        metavar="B,B,...",
        help="ImPart-QT: store the kept factor values as integers of these widths (1 to 8), the pairs with the "
        "largest singular values first, e.g. 8,4,3,2; --ratio then counts bits (see docs/quantization.md)",
    )
    sub.add_argument(
        "--bit-fractions",
        type=_float_list,
        default=None,
        metavar="F,F,...",
        help="with --bits: share of the stored pairs at each width, summing to 1 (default: each tier twice the "
        "one above, 1/15,2/15,4/15,8/15 for four widths)",
    )
    sub.add_argument(
        "--group-size",
        type=int,
        default=None,
        metavar="G",
        help="with --bits: values of one column sharing a float16 scale (default: 128)",
    )
    _device_option(sub, "run the SVDs (cuda is much faster; the bytes written depend on the device)")
    _output_options(sub)
    sub.add_argument(
        "--push-to-hub",
        type=_repo_id,
        default=None,
        metavar="ORG/NAME",
        help="upload the adapter to this Hub repo when done",
    )


def _inspect_arguments(sub: argparse.ArgumentParser) -> None:
    _positionals(sub, ("adapter", "ADAPTER", "the adapter: folder or Hub repo id"))
    _json_option(sub)


def _apply_arguments(sub: argparse.ArgumentParser) -> None:
    _positionals(
        sub,
        ("base", "BASE", "the base model the adapter was compressed against"),
        ("adapter", "ADAPTER", "the ImPart adapter: folder or Hub repo id"),
        ("output", "OUTPUT", "the model folder to write"),
    )
    _shard_option(sub, "largest safetensors shard, e.g. 5GB, 500MB (default: %(default)s)")
    _device_option(sub, "rebuild the deltas")
    _output_options(sub)


def _merge_arguments(sub: argparse.ArgumentParser) -> None:
    sub.usage = "impart merge [options] BASE FT1 [FT2 ...] OUTPUT"
    sub.add_argument(
        "models",
        nargs="+",
        metavar="PATH",
        help="BASE, then the fine-tunes FT1 FT2 ... (folders or Hub repo ids), then OUTPUT (the folder to write)",
    )
    sub.add_argument(
        "--method",
        choices=("task_arithmetic", "ties"),
        default="task_arithmetic",
        help="how the task vectors are merged (default: %(default)s)",
    )
    sub.add_argument(
        "--sparsify",
        choices=("impart", "dare", "magnitude", "none"),
        default="impart",
        help="how each task vector's matrices are sparsified first (default: %(default)s)",
    )
    sub.add_argument(
        "--density",
        type=float,
        default=0.2,
        help="fraction of each task vector kept, in (0, 1]; ImPart / DARE at ratio 1/density (default: %(default)s)",
    )
    sub.add_argument(
        "--weights",
        type=_float_list,
        default=None,
        metavar="W1,W2,...",
        help="one weight per fine-tune (default 1)",
    )
    sub.add_argument(
        "--scaling",
        type=float,
        default=1.0,
        metavar="LAMBDA",
        help="scale of the merged task vector (default 1)",
    )
    sub.add_argument(
        "--normalize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="divide by the sum of the contributing weights (default: yes for TIES, no for task arithmetic)",
    )
    sub.add_argument(
        "--majority-sign",
        choices=("total", "frequency"),
        default="total",
        help="TIES sign election: sign of the weighted sum, or of the count of signs (default: %(default)s)",
    )
    sub.add_argument(
        "--seed", type=_seed, default=0, help="seed of ImPart's / DARE's masks (fine-tune i: seed + i)"
    )
    _impart_options(sub, "ImPart's pre-pruning ratio", "ImPart's importance exponent")
    _shard_option(sub, "largest safetensors shard (default: %(default)s)")
    _device_option(sub, "run the SVDs")
    _output_options(sub)


def _eval_arguments(sub: argparse.ArgumentParser) -> None:
    _positionals(
        sub,
        ("base", "BASE", "the base model: folder or Hub repo id"),
        ("finetuned", "FINETUNED", "the fine-tune: folder or Hub repo id"),
        ("adapter", "ADAPTER", "the ImPart adapter: folder or Hub repo id"),
    )
    sub.add_argument("--text", metavar="FILE", default=None, help="a UTF-8 text file to evaluate on")
    sub.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=1024,
        help="tokens of the text used (default: %(default)s)",
    )
    sub.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16", "float16"),
        default="auto",
        help="dtype the models run in; auto = the checkpoints' (default: %(default)s)",
    )
    _device_option(sub, "run the models")
    _json_option(sub)
    sub.add_argument("--quiet", action="store_true", help="no loading progress bars")


def _push_arguments(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("adapter", metavar="ADAPTER", help="the adapter folder (from `impart compress`)")
    sub.add_argument("repo_id", metavar="ORG/NAME", type=_repo_id, help="the Hub repo to push to")
    sub.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its own)"
    )
    sub.add_argument("--revision", default=None, metavar="BRANCH", help="branch to push to (default: main)")
    sub.add_argument(
        "--tag", action="append", default=[], metavar="TAG", help="a task tag for the card (repeatable)"
    )
    sub.add_argument(
        "--license", default=None, metavar="ID", help="license of the fine-tune, e.g. apache-2.0"
    )
    sub.add_argument("--message", default=None, help="commit message")
    sub.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or login)")


# name, one-line help, description, options, what runs it
_COMMANDS: tuple[tuple[str, str, str, Callable[[argparse.ArgumentParser], None], Callable[..., int]], ...] = (
    (
        "compress",
        "compress a fine-tune against its base into an ImPart adapter",
        "Compress FINETUNED - BASE into an ImPart adapter folder OUTPUT, reading one tensor pair at a time "
        "(memory stays\nbounded by a few tensors). BASE and FINETUNED are local folders or Hub repo ids with "
        "config.json and\nsafetensors weights (sharded or not). The defaults are ImPartConfig's.",
        _compress_arguments,
        _cmd_compress,
    ),
    (
        "inspect",
        "show an adapter's modules, kept pairs and compression ratios",
        "Show, per module of an ImPart adapter (folder or Hub repo id): its shape, kept singular pairs, stored "
        "values,\nthe nominal compression ratio (dense matrix values / kept factor values) and the on-disk ratio "
        "(dense delta\nbytes in the fine-tune's dtype / bytes stored), and the totals. Reads no tensor.",
        _inspect_arguments,
        _cmd_inspect,
    ),
    (
        "apply",
        "write base + adapter as a standard transformers checkpoint",
        "Write BASE + ADAPTER as a standard transformers model folder OUTPUT (the merged fine-tune): sharded "
        "safetensors\nin the base's dtypes, the base's config.json, and tokenizer/generation files (the "
        "adapter's if it has them,\nelse the base's). One tensor at a time; the same weights as "
        "PeftModel.merge_and_unload().",
        _apply_arguments,
        _cmd_apply,
    ),
    (
        "merge",
        "merge several fine-tunes of one base (task arithmetic or TIES, ImPart / DARE sparsified)",
        "Merge fine-tunes FT1 FT2 ... of BASE into a standard transformers model folder OUTPUT, one tensor at a\n"
        "time: each task vector FT_i - BASE is sparsified (its matrices; ImPart by default, at --density), then\n"
        "merged by task arithmetic (BASE + lambda * sum_i w_i tau_i) or TIES (elected sign, disjoint mean).\n"
        "The weights are written in the base's dtypes. See docs/merging.md.",
        _merge_arguments,
        _cmd_merge,
    ),
    (
        "eval",
        "measure how close base + adapter is to the fine-tune",
        "Next-token KL(fine-tune || base + adapter) and KL(fine-tune || base), in nats per token, and the "
        "perplexities\nof the fine-tune, base + adapter and the base on a text (a built-in English text by "
        "default). The text is\ntokenised with the base's tokenizer, else the fine-tune's, else taken as UTF-8 "
        "bytes. One model in memory at a time.",
        _eval_arguments,
        _cmd_eval,
    ),
    (
        "push",
        "upload an adapter folder to the Hub with its model card",
        "Upload the ImPart adapter folder ADAPTER to the Hub repo ORG/NAME (created if needed) in one commit:\n"
        "adapter_config.json, adapter_model.safetensors, the tokenizer files it has, and a generated model card\n"
        "(README.md). The token is HF_TOKEN or the one saved by `hf auth login`, unless --token is given.",
        _push_arguments,
        _cmd_push,
    ),
)


def build_parser() -> argparse.ArgumentParser:
    """The ``impart`` argument parser (subcommands compress, inspect, apply, merge, eval, push). A command's options
    are built when it is parsed or its help shown, so that ``impart --help`` imports neither PEFT nor torch."""
    from ._version import __version__

    parser = _Parser(
        prog="impart",
        description="Ship a full fine-tune as a small ImPart adapter (PEFT), and use it.",
        epilog="Run 'impart COMMAND --help' for a command's options. Documentation: docs/cli.md.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"impart-peft {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text, description, arguments, run in _COMMANDS:

        def populate(sub: argparse.ArgumentParser, arguments=arguments, run=run) -> None:
            _debug_option(sub)
            arguments(sub)
            sub.set_defaults(func=run)

        commands.add_parser(
            name,
            help=help_text,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            populate=populate,
        )
    return parser


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split())
    if isinstance(error, KeyError):  # str(KeyError) is the quoted key alone
        message = f"missing key {message}"
    if not isinstance(error, _EXPECTED_ERRORS):
        message = f"{type(error).__name__}: {message}" if message else type(error).__name__
        message += " (run with --debug for the traceback)"
    return message or type(error).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # One line per warning, so that the command's output stays readable.
    print(f"impart: warning: {' '.join(str(message).split())}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``impart`` command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # Recorded in the model card as "how it was made" (no command takes a secret but `push --token`).
    args.command_line = shlex.join(["impart", *(sys.argv[1:] if argv is None else argv)])
    debug = getattr(args, "debug", False)
    with warnings.catch_warnings():
        if not debug:
            warnings.showwarning = _show_warning
            # Libraries' deprecation notices are for developers, not for someone running a command.
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            return args.func(args)
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"impart {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as error:
            if debug:
                raise
            with contextlib.suppress(Exception):
                sys.stdout.flush()
            print(f"impart {args.command}: error: {_one_line(error)}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
