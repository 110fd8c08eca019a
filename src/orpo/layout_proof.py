"""Proving a batch layout exact on the model itself, before it trains on it, and the first-batch step that
runs every such check on the prepared model.

A layout (:mod:`orpo.layouts`) is never trusted on the backend's name alone: :func:`layout_error` runs one
preference row laid out both ways and compares the log-probs, so a model that ignores restarting
``position_ids`` or our mask is caught before it trains on a wrong loss. :func:`choose_layout` picks the
fastest layout that passes (on the model's first layers when an engine prepares the model later, all
processes agreeing); :func:`first_batch_checks` repeats a pending check on the whole prepared model and
checks the separated LM head (:meth:`orpo.head.HeadRunner.resolve`), once, at the first batch.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from orpo.errors import OrpoError
from orpo.layouts import (
    NO_SEGMENT,
    PADDED,
    Layout,
    attn_implementation,
    candidate_layouts,
    model_inputs,
    shared_prefix_unit,
    unsupported_reason,
)
from orpo.logprobs import rounding_tolerance
from orpo.models import is_quantized

logger = logging.getLogger("orpo")

# Tokens of the probe row's prompt (its end) and responses (their start) the layout check uses.
_PROBE_TOKENS = 32
_SHARED_INPUTS = ("input_ids", "position_ids", "segment_ids")


@contextlib.contextmanager
def check_mode(model):
    """Eval mode without gradients, for the one-off checks that run the model beside training.

    Except for bitsandbytes-quantized models on CPU: their first eval-mode forward without gradients
    repacks the 4-bit weights for a CPU inference kernel, after which (bitsandbytes 0.50) no gradient
    reaches the LoRA adapters any more. Those keep training mode (dropout is off by default)."""
    parameter = next(model.parameters())
    quantized_on_cpu = is_quantized(model) and parameter.device.type == "cpu"
    was_training = model.training
    model.train(quantized_on_cpu)
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _probe_feature(feature: dict) -> dict:
    """A short copy of a tokenized pair: the prompt's end, the responses' start."""
    return {
        "prompt_input_ids": list(feature["prompt_input_ids"])[-_PROBE_TOKENS:],
        "chosen_input_ids": list(feature["chosen_input_ids"])[:_PROBE_TOKENS],
        "rejected_input_ids": list(feature["rejected_input_ids"])[:_PROBE_TOKENS],
    }


def _probe_batch(layout: Layout, feature: dict) -> dict:
    """Two copies of one pair in ``layout``, sharing one row where the layout packs (the second copy is the one
    compared, so leaks between sequences or units, as well as the chosen-hiding mask, show up); built from the
    layout's definitions (:mod:`orpo.layouts`), as the collators build theirs."""
    prompt, chosen, rejected = (
        list(feature[k]) for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    )
    if layout.shared:
        first, second = (
            shared_prefix_unit(prompt, chosen, rejected, u) for u in (0, 1 if layout.packed else 0)
        )
        if layout.packed:  # both units in one row
            return {
                name: torch.cat([a, b])[None]
                for name, a, b in zip(_SHARED_INPUTS, first, second, strict=True)
            }
        width = 2 * len(first[0])  # one unit per row, each padded to the width of two
        return {
            name: torch.stack(
                [F.pad(a, (0, width - len(a)), value=fill), F.pad(b, (0, width - len(b)), value=fill)]
            )
            for name, a, b, fill in zip(_SHARED_INPUTS, first, second, (0, 0, NO_SEGMENT), strict=True)
        }
    # Packed (the padded layout needs no proof): the pair's chosen and rejected sequences in one row.
    ids = [*prompt, *chosen, *prompt, *rejected]
    positions = [*range(len(prompt) + len(chosen)), *range(len(prompt) + len(rejected))]
    return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions])}


def _compared_positions(layout: Layout, p: int, c: int, r: int, width: int) -> dict[str, torch.Tensor]:
    """Flat positions, in :func:`_probe_batch`'s rows, of the second copy's ``prompt + chosen`` and
    ``prompt + rejected`` tokens (packed only: of the rejected sequence that follows the chosen one)."""
    if not layout.shared:
        return {"rejected": torch.arange(p + c, p + c + p + r)}
    start = p + c + r if layout.packed else width  # after the first unit, or the second row
    prompt = torch.arange(start, start + p)
    return {
        "chosen": torch.cat([prompt, torch.arange(start + p, start + p + c)]),
        "rejected": torch.cat([prompt, torch.arange(start + p + c, start + p + c + r)]),
    }


def layout_error(model, config, layout: Layout, feature: dict) -> float:
    """max |Δ log p| between a pair's tokens laid out in ``layout`` (beside another copy of the pair)
    and the same sequences run alone, in eval mode without gradients: rounding only when the model
    honours the layout, far more when attention leaks between sequences, units or chosen and rejected."""
    if layout == PADDED:
        return 0.0
    feature = _probe_feature(feature)
    prompt, chosen, rejected = (
        feature[k] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
    )
    parameter = next(model.parameters())
    batch = {k: v.to(parameter.device) for k, v in _probe_batch(layout, feature).items()}
    compared = _compared_positions(
        layout, len(prompt), len(chosen), len(rejected), batch["input_ids"].shape[1]
    )
    error = 0.0
    with check_mode(model):
        logits = model(**model_inputs(batch, config, parameter.dtype), use_cache=False).logits
        laid_out = logits.reshape(-1, logits.shape[-1]).float().log_softmax(-1)
        for side, positions in compared.items():
            ids = torch.tensor([prompt + (chosen if side == "chosen" else rejected)], device=parameter.device)
            alone = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            difference = laid_out[positions.to(parameter.device)] - alone[0].float().log_softmax(-1)
            error = max(error, difference.abs().max().item())
    return error


def probe_ready(model) -> bool:
    """Whether the model can run the layout check here: no parameter is on the meta device (as an
    engine's rank-0-only loading leaves the other processes' models). ZeRO-3 partitions are gathered
    for the check (:func:`whole_parameters`)."""
    return not any(p.is_meta for p in model.parameters())


def whole_parameters(model):
    """A context in which the model's parameters are whole: ZeRO-3 partitions (a model initialised or
    loaded under ``zero.Init``) are gathered, on every process together; anything else is left as is."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


@contextlib.contextmanager
def first_layers(model, keep: int = 2):
    """While active, the model runs only its first ``keep`` decoder layers (and the first layer of each
    attention type its config lists, e.g. a sliding-window one and a full one). The layout check tests
    how the model family builds masks and positions, which those layers show as well as all of them:
    so it can run on the CPU, before an engine (FSDP, DeepSpeed) places the model, in a fraction of
    the time. The whole model is checked again on the first batch."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    found = next(
        (
            (module, name, child)
            for module in model.modules()
            for name, child in module.named_children()
            if isinstance(child, torch.nn.ModuleList) and len(child) == count
        ),
        None,
    )
    if found is None or count <= keep:
        yield
        return
    parent, name, layers = found
    types = list(getattr(config, "layer_types", None) or [])
    kept = sorted({*range(keep), *(types.index(kind) for kind in set(types))})
    setattr(parent, name, torch.nn.ModuleList([layers[i] for i in kept]))
    config.num_hidden_layers = len(kept)
    if len(types) == count:
        config.layer_types = [types[i] for i in kept]
    try:
        yield
    finally:
        setattr(parent, name, layers)
        config.num_hidden_layers = count
        if len(types) == count:
            config.layer_types = types


def leak_message(config, layout: Layout, error: float) -> str:
    leak = (
        "rejected tokens see chosen ones or pairs see each other"
        if layout.shared
        else "packed sequences attend to each other"
    )
    return (
        f"{layout.options}: {config.model_type} with attn_implementation="
        f"{attn_implementation(config)!r} does not keep this layout exact ({leak}; "
        f"max |Δ log p| = {error:.3g} against the sequences alone)"
    )


def first_exact_layout(model, candidates: list[Layout], row: dict | None, low_precision: bool) -> Layout:
    """The first candidate the backend supports and, given a data ``row``, the model keeps exact. An
    unsupported or inexact candidate falls through to the next with a warning; the last one raises."""
    config = model.config
    for index, layout in enumerate(candidates):
        last = index == len(candidates) - 1
        reason = unsupported_reason(layout, config)
        if reason is not None:
            if last:
                option = "prefix_sharing" if layout.shared else "padding_free"
                raise OrpoError(f"{reason}; set {option}: false or attn_implementation: sdpa")
            continue
        if layout == PADDED or row is None:
            return layout
        error = layout_error(model, config, layout, row)
        if error <= rounding_tolerance(low_precision):
            return layout
        problem = leak_message(config, layout, error)
        if last:
            raise OrpoError(problem)
        warnings.warn(f"{problem}; trying the next layout", stacklevel=4)
    raise AssertionError("unreachable: the last candidate either returns or raises")


@dataclass(frozen=True)
class LayoutChoice:
    layout: Layout
    pending: PendingLayoutCheck | None  # checked on the whole prepared model at the first batch


def choose_layout(
    model,
    row: dict | None,
    *,
    padding_free: bool | None,
    prefix_sharing: bool | None,
    engine: bool,
    low_precision: bool,
    agree: Callable[[Layout], Layout],
) -> LayoutChoice:
    """The first of the candidate layouts (``padding_free`` / ``prefix_sharing``: True, False or None
    = auto; fastest first) that the attention backend supports and the (unwrapped) model honours
    exactly, checked on the first data ``row``. An auto choice that fails falls back to the next one
    with a warning; a layout asked for that fails is an error.

    A model an ``engine`` prepares later (FSDP, DeepSpeed, model parallel) is checked here on its first
    decoder layers, where it is (usually the CPU; ZeRO-3 partitions gathered); all processes then take
    the most conservative of their choices (``agree``, see :func:`agreed_layout`), and the whole prepared
    model is checked again on the first batch, where a failure can only be an error. A model not at hand
    here (meta parameters), or no data row yet: only layouts asked for explicitly, checked on the first
    batch; auto means padded rows."""
    explicit = candidate_layouts(bool(padding_free), bool(prefix_sharing))
    layout = None
    if row is not None and (not engine or probe_ready(model)):
        candidates = candidate_layouts(padding_free, prefix_sharing)
        if not engine:
            return LayoutChoice(first_exact_layout(model, candidates, row, low_precision), pending=None)
        try:
            with first_layers(model), whole_parameters(model):
                layout = first_exact_layout(model, candidates, row, low_precision)
        except OrpoError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError) as err:  # a model the cut breaks
            logger.info(f"batch layout: not checked before the engine prepares the model ({err})")
    if layout is None:
        layout = first_exact_layout(model, explicit, None, low_precision)
    if engine:
        layout = agree(layout)
    unverified = layout != PADDED and (engine or row is None)
    return LayoutChoice(layout, PendingLayoutCheck(layout, low_precision) if unverified else None)


def agreed_layout(layout: Layout, accelerator) -> Layout:
    """One layout for all processes (their collators and token budgets must match): the latest in
    the fastest-first order of any process's choice, e.g. padded rows where one process could not
    check its model."""
    if accelerator.num_processes == 1:
        return layout
    order = candidate_layouts(None, None)
    index = torch.tensor([order.index(layout)], device=accelerator.device)
    return order[int(accelerator.gather(index).max())]


def verify_layout(model, config, layout: Layout, row: dict, low_precision: bool) -> None:
    """The first-batch check of a layout chosen before an engine prepared the model, on the whole model."""
    error = layout_error(model, config, layout, row)
    if not error <= rounding_tolerance(low_precision):
        raise OrpoError(
            leak_message(config, layout, error) + "; set padding_free: false and prefix_sharing: false"
        )


@dataclass
class PendingLayoutCheck:
    """A layout chosen before an engine prepared the model, or without a data row: what the first batch checks
    (on the first data row there is then)."""

    layout: Layout
    low_precision: bool


def first_batch_checks(
    model, head, inputs: dict, pending: PendingLayoutCheck | None, row: dict | None
) -> None:
    """The one first-batch step, on the prepared model: a ``pending`` layout check on the whole model with the
    first data ``row``, then the separated LM head against the model's own logits
    (:meth:`orpo.head.HeadRunner.resolve`)."""
    if pending is not None and row is not None:
        verify_layout(model, head.model_config(model), pending.layout, row, pending.low_precision)
    head.resolve(model, inputs)
