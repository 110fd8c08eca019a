"""Which batch layout a model can run exactly, the model inputs of each layout, and the check that
proves it on the model itself.

The collators (:mod:`orpo.data.collator`) lay tokens out; this module decides which of them a model and
attention backend support and turns a collated batch into forward arguments (the shared-prefix
layouts need a mask of their own). A layout is never trusted on the backend's name alone:
:func:`layout_error` runs one preference row laid out both ways and compares the log-probs, so a
model that ignores restarting ``position_ids`` or our mask is caught before it trains on a wrong loss.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from orpo.data.collator import (
    CHOSEN,
    REJECTED,
    PackedPairCollator,
    PaddedPairCollator,
    SharedPrefixCollator,
    first_fit_decreasing,
)
from orpo.errors import OrpoError
from orpo.logprobs import rounding_tolerance
from orpo.models import is_quantized

logger = logging.getLogger("orpo")

# Backends that take our shared-prefix mask as it is: a 4D tensor, or flex attention's block mask (flash
# attention takes no mask at all).
PREFIX_SHARING_BACKENDS = ("eager", "sdpa", "flex_attention")
# Backends whose transformers integration confines attention to each packed sequence from restarting
# position_ids (block-causal masks for eager / sdpa / flex, variable-length kernels for flash).
PACKING_BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")

# Tokens of the probe row's prompt (its end) and responses (their start) the layout check uses.
_PROBE_TOKENS = 32


@dataclass(frozen=True)
class Layout:
    """A batch layout: ``packed`` sequences (or pairs) share rows; ``shared`` prompts run once per pair."""

    packed: bool = False
    shared: bool = False

    @property
    def description(self) -> str:
        if self.shared:
            return "shared prompt prefix" + (
                ", pairs packed into rows" if self.packed else ", one row per pair"
            )
        return "padding-free packed rows" if self.packed else "padded rows"

    @property
    def options(self) -> str:
        """The config options that select this layout, for messages."""
        return f"padding_free={str(self.packed).lower()}, prefix_sharing={str(self.shared).lower()}"

    def batch_tokens(self, pairs: list[tuple[int, int, int]]) -> int:
        """Tokens (padding included) a batch of pairs with these ``(prompt, chosen, rejected)`` lengths
        takes in this layout: rows times row width, as the collators lay them out."""
        if self.shared:
            units = [p + c + r for p, c, r in pairs]
        else:
            units = [p + c for p, c, _ in pairs] + [p + r for p, _, r in pairs]
        width = max(units)
        rows = len(first_fit_decreasing(units, width)) if self.packed else len(units)
        return rows * width

    def collator(self, pad_token_id: int, nll_include_prompt: bool):
        if self.shared:
            return SharedPrefixCollator(pad_token_id, nll_include_prompt, pack=self.packed)
        if self.packed:
            return PackedPairCollator(pad_token_id, nll_include_prompt)
        return PaddedPairCollator(pad_token_id, nll_include_prompt)


PADDED = Layout()


def attn_implementation(config) -> str | None:
    return getattr(config, "_attn_implementation", None)


def unsupported_reason(layout: Layout, config) -> str | None:
    """Why ``layout`` cannot run on a model with this config, or None if its backend supports it."""
    impl = attn_implementation(config)
    if layout.shared and impl not in PREFIX_SHARING_BACKENDS:
        return (
            f"prefix_sharing: {config.model_type} with attn_implementation={impl!r} is not supported "
            f"(supported: {', '.join(PREFIX_SHARING_BACKENDS)})"
        )
    if layout.packed and not layout.shared and impl not in PACKING_BACKENDS:
        return (
            f"padding_free: {config.model_type} with attn_implementation={impl!r} is not supported "
            f"(supported: {', '.join(PACKING_BACKENDS)})"
        )
    return None


def candidate_layouts(padding_free: bool | None, prefix_sharing: bool | None) -> list[Layout]:
    """Layouts to try, fastest first: an option set to True or False is fixed, None (auto) tries both."""
    packed = [True, False] if padding_free is None else [padding_free]
    shared = [True, False] if prefix_sharing is None else [prefix_sharing]
    return [Layout(packed=p, shared=s) for s in shared for p in packed]


def _attends(query, key, query_segment, key_segment):
    """Whether a query token may attend to a key token of a :class:`~orpo.data.collator.SharedPrefixCollator`
    row (broadcasting indices and segment ids): causal within each unit (pair), never a padding key,
    rejected tokens never see chosen ones; every token sees itself, so padding rows are not empty."""
    allowed = (
        (query >= key)
        & (key_segment >= 0)
        & (query_segment // 3 == key_segment // 3)  # same unit
        & ~((query_segment % 3 == REJECTED) & (key_segment % 3 == CHOSEN))
    )
    return allowed | (query == key)


def shared_prefix_mask(segment_ids: torch.Tensor, attn_implementation: str, dtype: torch.dtype):
    """The attention mask of shared-prefix rows, in the form the backend takes: a flex-attention
    ``BlockMask`` (blocks no query sees, such as a rejected response's view of its chosen one, are
    skipped, and no ``[T, T]`` mask is kept); a 4D boolean mask for sdpa; an additive one
    (0 / dtype min) for eager, which adds the mask to the scores."""
    batch, length = segment_ids.shape
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, q, k):
            return _attends(q, k, segment_ids[b, q], segment_ids[b, k])

        # compiled, as transformers builds its own block masks: uncompiled, it materialises B x T x T
        return create_block_mask(
            mask_mod, batch, None, length, length, device=segment_ids.device, _compile=True
        )
    index = torch.arange(length, device=segment_ids.device)
    allowed = _attends(index[:, None], index[None, :], segment_ids[:, :, None], segment_ids[:, None, :])
    allowed = allowed[:, None]  # [B, 1, T, T]
    if attn_implementation == "sdpa":
        return allowed
    mask = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)


def model_inputs(batch: dict, config, dtype: torch.dtype) -> dict:
    """The forward arguments of a collated batch: padded rows carry an ``attention_mask``; packed rows
    carry restarting ``position_ids`` and no mask (that is how transformers recognises packed
    sequences); shared-prefix rows get their mask built from ``segment_ids``."""
    kwargs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    if "segment_ids" in batch:
        impl = attn_implementation(config)
        if impl not in PREFIX_SHARING_BACKENDS:
            raise ValueError(unsupported_reason(Layout(shared=True), config))
        kwargs["attention_mask"] = shared_prefix_mask(batch["segment_ids"], impl, dtype)
    return kwargs


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
    """Two copies of one pair in one row of ``layout`` (the second copy is the one compared, so
    leaks between sequences or units, as well as the chosen-hiding mask, show up)."""
    features = [feature, feature]
    if layout.shared:
        width = 2 * sum(
            len(feature[k]) for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
        )
        bins = [[0, 1]] if layout.packed else [[0], [1]]
        return SharedPrefixCollator(0, nll_include_prompt=True).lay_out(features, bins, width)
    if layout.packed:
        # Force the pair's chosen and rejected sequences into one row: pack into twice the width.
        prompt, chosen, rejected = (
            feature[k] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
        )
        ids = [*prompt, *chosen, *prompt, *rejected]
        positions = [*range(len(prompt) + len(chosen)), *range(len(prompt) + len(rejected))]
        return {"input_ids": torch.tensor([ids]), "position_ids": torch.tensor([positions])}
    return PaddedPairCollator(0, nll_include_prompt=True)(features)


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
    batch = {
        k: v.to(parameter.device) for k, v in _probe_batch(layout, feature).items() if torch.is_tensor(v)
    }
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
    unverified: bool  # to be checked on the whole prepared model at the first batch (verify_layout)


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
            return LayoutChoice(first_exact_layout(model, candidates, row, low_precision), unverified=False)
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
    return LayoutChoice(layout, unverified=layout != PADDED and (engine or row is None))


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
