"""The first pass of a planned compression: per-matrix ratio, beta and C for ``target_size`` and ``"auto"``.

:func:`impart_peft.from_finetuned` and :func:`impart_peft.checkpoints.compress_checkpoints` measure every module
first (:class:`ModuleMeasure`: the matrix's singular values and the sizes of its dense vectors, nothing the size of
a matrix), call :func:`plan_settings`, then compress each module with its :class:`ModuleSettings`. Memory stays
flat in model size: the first pass keeps ``min(m, n)`` numbers per matrix.

The plan is made on the exact bytes of ``adapter_model.safetensors``: every tensor's name, dtype and shape follow
from the allocations (the counts fix the shapes), so the header and the file size are known before anything is
compressed, and the file written is exactly :func:`adapter_file_size` bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .allocation import Allocation, allocate_keep_prob, factor_value_budget, target_keep_fraction
from .budget import (
    BudgetTooSmallError,
    MatrixPlan,
    MatrixSpectrum,
    choose_settings,
    paper_keep_prob,
    parse_target_size,
    plan_budget,
    ratio_grid,
)
from .config import ImPartConfig
from .filenames import ADAPTER_PREFIX
from .safetensors_io import SAFETENSORS_METADATA, _safetensors_header, itemsize, save_file_order

__all__ = ["ModuleMeasure", "ModuleSettings", "adapter_file_size", "format_size", "plan_settings"]

# Names and dtypes of a compressed matrix's tensors besides its values (which are in the fine-tune's dtype).
_PAIR_TENSORS = (("impart_singular_values", torch.float32), ("impart_keep_count", torch.int32))


@dataclass
class ModuleMeasure:
    """One module as the first pass saw it.

    Attributes:
        name: module name.
        shape: ``(m, n)`` of the weight delta, or ``None`` (a module of vectors only).
        singular_values: float64 ``(min(m, n),)`` of the weight delta, descending; ``None`` when the weight did not
            change.
        storage_dtype: dtype of the stored factor values (the fine-tune's).
        vectors: ``(parameter name, dtype, length)`` of every changed 1-D parameter, stored densely.
    """

    name: str
    shape: tuple[int, int] | None
    singular_values: np.ndarray | None
    storage_dtype: torch.dtype | None
    vectors: list[tuple[str, torch.dtype, int]] = field(default_factory=list)

    @property
    def has_matrix(self) -> bool:
        return (
            self.singular_values is not None
            and bool(self.singular_values.size)
            and self.singular_values[0] > 0
        )


@dataclass(frozen=True)
class ModuleSettings:
    """What one matrix is compressed with: its ratio, beta and C, and the allocation made from the first pass's
    spectrum (used as it is by :func:`~impart_peft.delta.compress_delta`)."""

    compression_ratio: float | None
    pre_prune_ratio: float
    importance_exponent: float
    allocation: Allocation

    def meta(self) -> dict[str, float | None]:
        """The fields ``module_meta`` records."""
        return {
            "compression_ratio": self.compression_ratio,
            "pre_prune_ratio": self.pre_prune_ratio,
            "importance_exponent": self.importance_exponent,
        }


def format_size(nbytes: int) -> str:
    """``"26.8 MB"``: decimal units, as ``target_size`` reads them."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.4g} {unit}"
    return f"{nbytes} B"


def _entries(
    measures: dict[str, ModuleMeasure], allocations: dict[str, Allocation]
) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    entries = []
    for name, measure in measures.items():
        prefix = f"{ADAPTER_PREFIX}{name}."
        allocation = allocations.get(name)
        if allocation is not None and allocation.boundary:
            rank = allocation.boundary
            entries.append((prefix + "impart_singular_values", torch.float32, (rank,)))
            entries.append((prefix + "impart_keep_count", torch.int32, (2, rank)))
            counts = allocation.keep_count.sum(dim=1)
            entries.append((prefix + "impart_u_values", measure.storage_dtype, (int(counts[0]),)))
            entries.append((prefix + "impart_v_values", measure.storage_dtype, (int(counts[1]),)))
        for param_name, dtype, length in measure.vectors:
            entries.append((f"{prefix}impart_delta_{param_name}", dtype, (length,)))
    return entries


def adapter_file_size(measures: dict[str, ModuleMeasure], allocations: dict[str, Allocation]) -> int:
    """Bytes of the ``adapter_model.safetensors`` these allocations give: header and data, exactly."""
    entries = _entries(measures, allocations)
    header = _safetensors_header(save_file_order(entries), SAFETENSORS_METADATA)
    return len(header) + sum(math.prod(shape) * itemsize(dtype) for _, dtype, shape in entries)


def _rescaled_keep_prob(sigma, shape, budgets, beta, exponent) -> np.ndarray:
    """``"rescaled"`` rule's keep probabilities for many budgets (one allocation each: slower than the paper's)."""
    m, n = shape
    rank = min(m, n)
    rows = []
    for budget in budgets:
        mean_keep = min(1.0, float(budget) / (rank * (m + n)))
        allocation = allocate_keep_prob(
            torch.from_numpy(np.ascontiguousarray(sigma)),
            shape,
            None,
            beta,
            exponent,
            "rescaled",
            mean_keep=mean_keep,
        )
        rows.append(allocation.keep_prob.numpy())
    return np.stack(rows)


def _allocate(measure: ModuleMeasure, plan: MatrixPlan | None, config: ImPartConfig, ratio) -> ModuleSettings:
    sigma = torch.from_numpy(np.ascontiguousarray(measure.singular_values))
    beta = plan.pre_prune_ratio if plan is not None else 0.0
    exponent = plan.importance_exponent if plan is not None else 1.0
    allocation = allocate_keep_prob(sigma, measure.shape, ratio, beta, exponent, rule=config.allocation)
    if (
        plan is not None and allocation.budget != plan.budget
    ):  # the ratio's floor must give the plan's budget back
        raise RuntimeError(
            f"{measure.name}: planned {plan.budget} values, the allocation pays for {allocation.budget}"
        )
    return ModuleSettings(ratio, beta, exponent, allocation)


def plan_settings(measures: dict[str, ModuleMeasure], config: ImPartConfig) -> dict[str, ModuleSettings]:
    """Per-matrix settings for a config with ``target_size`` and/or ``"auto"`` beta / C (``config.planned``).

    * ``target_size`` (the byte cap, or ``dense matrix bytes / ratio``) with ``size_rule="uniform"``: the smallest
      one ratio whose exact file fits (each matrix at least its top pair whole).
    * ``target_size`` with ``size_rule="spectral"``: the cap is spread over the matrices by
      :func:`impart_peft.budget.plan_budget`; if the exact file size is still above the cap, the matrix whose next
      smaller budget costs the least damage per byte saved steps down, until it fits.
    * ``"auto"`` without ``target_size``: every matrix at ``config.compression_ratio``, with the grid's beta, C
      that minimise its expected damage.

    Raises:
        BudgetTooSmallError: the cap is too small; ``.smallest`` and the message name the smallest size that works.
    """
    keep_prob_fn = paper_keep_prob if config.allocation == "paper" else _rescaled_keep_prob
    spectra = {
        name: MatrixSpectrum(name, measure.shape, measure.singular_values, itemsize(measure.storage_dtype))
        for name, measure in measures.items()
        if measure.has_matrix
    }

    def uniform(ratio: float | None, floor: bool = False) -> dict[str, ModuleSettings]:
        """Every matrix at ``ratio`` (``floor``: at most its top pair whole), the grid's best (beta, C) if auto."""
        settings = {}
        for name, spectrum in spectra.items():
            if ratio is None:  # lossless: every pair whole, beta and C do not matter
                settings[name] = _allocate(measures[name], None, config, None)
                continue
            budget = factor_value_budget(spectrum.shape, target_keep_fraction(spectrum.shape, ratio))
            matrix_ratio = ratio
            if floor and budget < spectrum.min_values:
                budget = spectrum.min_values
                matrix_ratio = math.prod(spectrum.shape) / budget
            plan = choose_settings(
                spectrum, budget, config.pre_prune_ratio, config.importance_exponent, keep_prob_fn
            )
            settings[name] = _allocate(measures[name], plan, config, matrix_ratio)
        return settings

    if config.target_size is None:
        return uniform(config.compression_ratio)
    if config.size_rule == "uniform":
        return _fit_uniform(measures, spectra, config, uniform)

    cap = _cap(spectra, config)
    beta, exponent = config.pre_prune_ratio, config.importance_exponent
    fixed = adapter_file_size(measures, {})  # vectors and the header without any matrix
    # An upper bound of each matrix's header entries: its four names, with 20 digits for every number.
    digits = len(str(max(cap, 1)))
    for name, spectrum in spectra.items():
        overhead = sum(len(f"{ADAPTER_PREFIX}{name}.{t}") + 60 + 2 * digits for t in _TENSOR_NAMES)
        spectra[name] = MatrixSpectrum(
            name, spectrum.shape, spectrum.singular_values, spectrum.value_bytes, overhead
        )

    def smallest_plan() -> tuple[dict[str, MatrixPlan], dict[str, ModuleSettings], int]:
        plans, settings = {}, {}
        for name, spectrum in spectra.items():
            budget = int(ratio_grid(spectrum.shape)[0])
            plans[name] = choose_settings(spectrum, budget, beta, exponent, keep_prob_fn)
            settings[name] = _allocate(measures[name], plans[name], config, plans[name].compression_ratio)
        return plans, settings, adapter_file_size(measures, {n: s.allocation for n, s in settings.items()})

    def too_small(smallest: int) -> ValueError:
        return _too_small(measures, spectra, config, cap, smallest)

    try:
        plans = plan_budget(list(spectra.values()), cap - fixed, beta, exponent, keep_prob_fn, spread=SPREAD)
    except BudgetTooSmallError:
        try:  # the ratio window around the uniform ratio may be what does not fit
            plans = plan_budget(list(spectra.values()), cap - fixed, beta, exponent, keep_prob_fn)
        except BudgetTooSmallError:
            # The estimate bounds each header entry from above; the exact smallest file may still fit.
            plans, settings, smallest = smallest_plan()
            if smallest > cap:
                raise too_small(smallest) from None
            return settings
    settings = {name: _allocate(measures[name], p, config, p.compression_ratio) for name, p in plans.items()}
    size = adapter_file_size(measures, {n: s.allocation for n, s in settings.items()})
    candidates: dict[str, tuple[float, MatrixPlan, ModuleSettings] | None] = {}
    while size > cap:
        for name in spectra:
            if name not in candidates:
                candidates[name] = _step_down(
                    spectra[name],
                    plans[name],
                    measures[name],
                    settings[name],
                    config,
                    beta,
                    exponent,
                    keep_prob_fn,
                )
        options = [(c[0], name) for name, c in candidates.items() if c is not None]
        if not options:
            raise too_small(smallest_plan()[2])
        _, name = min(options)
        _, plans[name], settings[name] = candidates.pop(name)
        size = adapter_file_size(measures, {n: s.allocation for n, s in settings.items()})
    return settings


def _cap(spectra: dict[str, MatrixSpectrum], config: ImPartConfig) -> int:
    dense_bytes = sum(math.prod(s.shape) * s.value_bytes for s in spectra.values())
    return parse_target_size(config.target_size).cap(dense_bytes)


def _too_small(measures, spectra, config: ImPartConfig, cap: int, smallest: int) -> BudgetTooSmallError:
    return BudgetTooSmallError(
        f"target_size {config.target_size!r} ({cap} bytes) is too small for this fine-tune: the smallest adapter, "
        f"the top singular pair of each of its {len(spectra)} changed matrices kept whole plus "
        f"{sum(len(m.vectors) for m in measures.values())} dense vectors, is {smallest} bytes "
        f"({format_size(smallest)}). Ask for target_size={smallest} or more, or leave modules out "
        "(exclude_modules, include_embeddings=False)",
        smallest,
    )


def _fit_uniform(measures, spectra, config: ImPartConfig, uniform) -> dict[str, ModuleSettings]:
    """``size_rule="uniform"``: the smallest one ratio (each matrix at least its top pair whole) whose exact file
    fits the cap, by bisection on the ratio (the file shrinks as the ratio grows)."""
    cap = _cap(spectra, config)

    def size(settings: dict[str, ModuleSettings]) -> int:
        return adapter_file_size(measures, {n: s.allocation for n, s in settings.items()})

    low = 1.05
    high = max([math.prod(s.shape) / s.min_values for s in spectra.values()] + [low])
    best = uniform(high, floor=True)
    if size(best) > cap:
        raise _too_small(measures, spectra, config, cap, size(best))
    candidate = uniform(low, floor=True)
    if size(candidate) <= cap:
        return candidate
    for _ in range(40):  # in log space: 40 halvings pin the ratio far below one grid step
        if high / low <= 1 + 1e-7:
            break
        middle = math.sqrt(low * high)
        candidate = uniform(middle, floor=True)
        if size(candidate) <= cap:
            high, best = middle, candidate
        else:
            low = middle
    return best


# Per-matrix ratios stay within this factor of the one ratio that would fill the budget uniformly (see
# docs/algorithm.md section 12: wider windows lowered the task quality on the real pairs).
SPREAD = 2.0
_TENSOR_NAMES = ("impart_singular_values", "impart_keep_count", "impart_u_values", "impart_v_values")


def _step_down(spectrum, plan, measure, current, config, beta, exponent, keep_prob_fn):
    """(damage added per byte saved, the plan, its settings) of this matrix's next smaller budget, or ``None``."""
    budgets = ratio_grid(spectrum.shape)
    smaller = budgets[budgets < plan.budget]
    if smaller.size == 0:
        return None
    new_plan = choose_settings(spectrum, int(smaller[-1]), beta, exponent, keep_prob_fn)
    new = _allocate(measure, new_plan, config, new_plan.compression_ratio)

    def nbytes(allocation: Allocation) -> int:
        return int(allocation.keep_count.sum()) * spectrum.value_bytes + 12 * allocation.boundary

    saved = max(1, nbytes(current.allocation) - nbytes(new.allocation))
    return (new_plan.damage - plan.damage) / saved, new_plan, new
