"""What a batch layout is: the layouts (:class:`Layout`), how a shared-prefix row numbers its segments, which
attention backends take which layout, the masks and model inputs of each, and how many tokens a batch
takes in it.

The collators (:mod:`orpo.data.collator`) lay tokens out by these definitions; :mod:`orpo.layout_proof`
proves on the model itself that a layout is exact before the model trains on it; the head runner
(:mod:`orpo.head`) turns a collated batch into forward arguments with :func:`model_inputs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Backends that take our shared-prefix mask as it is: a 4D tensor, or flex attention's block mask (flash
# attention takes no mask at all).
PREFIX_SHARING_BACKENDS = ("eager", "sdpa", "flex_attention")
# Backends whose transformers integration confines attention to each packed sequence from restarting
# position_ids (block-causal masks for eager / sdpa / flex, variable-length kernels for flash).
PACKING_BACKENDS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3")

# ---- the shared-prefix segments: one code per token, ``3 * unit + kind`` (``unit`` numbers the pairs laid out
# in one row), NO_SEGMENT for padding. Written and read only through these functions.
PROMPT, CHOSEN, REJECTED = 0, 1, 2
NO_SEGMENT = -1


def segment_code(unit, kind):
    """The segment code of a token of pair ``unit`` of its row, part ``kind`` (PROMPT, CHOSEN, REJECTED)."""
    return 3 * unit + kind


def segment_unit(code):
    """The unit (pair within its row) of segment codes (ints or tensors); meaningless for NO_SEGMENT."""
    return code // 3


def segment_kind(code):
    """PROMPT, CHOSEN or REJECTED of segment codes (ints or tensors); meaningless for NO_SEGMENT."""
    return code % 3


def shared_prefix_unit(prompt: list[int], chosen: list[int], rejected: list[int], unit: int):
    """One pair as a shared-prefix unit: ``(input_ids, position_ids, segment_ids)`` of ``[prompt][chosen]
    [rejected]``, the rejected positions continuing from the prompt as if chosen were not there."""
    p, c, r = len(prompt), len(chosen), len(rejected)
    ids = torch.tensor(prompt + chosen + rejected, dtype=torch.long)
    positions = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
    kinds = torch.tensor([PROMPT] * p + [CHOSEN] * c + [REJECTED] * r, dtype=torch.long)
    return ids, positions, segment_code(unit, kinds)


def first_fit_decreasing(lengths: list[int], width: int) -> list[list[int]]:
    """Indices of ``lengths`` grouped into bins of at most ``width`` tokens, longest first, each into
    the first bin with room: few bins, and none longer than ``width``."""
    bins: list[list[int]] = []
    room: list[int] = []
    for item in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        target = next((b for b, free in enumerate(room) if free >= lengths[item]), None)
        if target is None:
            bins.append([])
            room.append(width)
            target = len(bins) - 1
        bins[target].append(item)
        room[target] -= lengths[item]
    return bins


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
    """Whether a query token may attend to a key token of a shared-prefix row (broadcasting indices and
    segment codes): causal within each unit (pair), never a padding key, rejected tokens never see chosen
    ones; every token sees itself, so padding rows are not empty."""
    allowed = (
        (query >= key)
        & (key_segment != NO_SEGMENT)
        & (segment_unit(query_segment) == segment_unit(key_segment))
        & ~((segment_kind(query_segment) == REJECTED) & (segment_kind(key_segment) == CHOSEN))
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


def first_sequence(inputs: dict, max_tokens: int) -> dict:
    """The first sequence of a collated batch (at most ``max_tokens``), unpadded, as model inputs."""
    if "segment_ids" in inputs:  # shared prefix: the prompt and chosen tokens of the row's first unit
        segments = inputs["segment_ids"][0]
        first_unit = (segments != NO_SEGMENT) & (segment_unit(segments) == 0)
        length = int((first_unit & (segment_kind(segments) != REJECTED)).sum())
    elif "position_ids" in inputs:
        restarts = (inputs["position_ids"][0, 1:] == 0).nonzero()
        length = int(restarts[0]) + 1 if len(restarts) else inputs["input_ids"].shape[1]
    else:
        length = int(inputs["attention_mask"][0].sum())
    ids = inputs["input_ids"][:1, : min(length, max_tokens)]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
