"""Batch layouts: turn tokenized pairs into model inputs plus a layout-independent list of scored tokens.

Every layout produces the same description of what to score (:class:`orpo.scored.ScoredTokens`: for each
scored token the hidden state that predicts it, its id, its pair, chosen or rejected, response or prompt),
so the loss never knows which layout made the log-probs. How each layout places tokens (positions,
shared-prefix segments, packing) is defined in :mod:`orpo.layouts`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orpo.errors import OrpoError
from orpo.layouts import NO_SEGMENT, Layout, first_fit_decreasing, shared_prefix_unit
from orpo.scored import FIELDS, ScoredTokens


def _pair_rows(features: list[dict]) -> list[tuple[list[int], list[int], int, bool]]:
    """``(prompt ids, response ids, pair, chosen)`` for the 2B sequences: chosen ones first."""
    rows = []
    for chosen in (True, False):
        key = "chosen_input_ids" if chosen else "rejected_input_ids"
        for pair, feature in enumerate(features):
            rows.append((list(feature["prompt_input_ids"]), list(feature[key]), pair, chosen))
    return rows


def _scored_tokens(rows, starts, nll_include_prompt: bool, flat_index=None) -> ScoredTokens:
    """The scored tokens, pair by pair (pair 0 chosen, pair 0 rejected, pair 1 chosen, ...) so each pair's
    tokens are contiguous and the head can work on chunks of whole pairs. ``starts[r]`` is the flat index of
    sequence ``r``'s first token in ``input_ids`` (contiguous sequences), or ``flat_index[r][t]`` the flat
    index of its token ``t`` (sequences laid out in pieces)."""
    num_pairs = len(rows) // 2
    positions, targets, pairs, is_chosen, is_response, sizes = [], [], [], [], [], []
    for pair in range(num_pairs):
        sizes.append(0)
        for row in (pair, num_pairs + pair):
            prompt, response, _, chosen = rows[row]
            tokens = torch.tensor(prompt + response, dtype=torch.long)
            # Token t is predicted by the hidden state at t - 1; position 0 has no predictor.
            first = 1 if (chosen and nll_include_prompt) else max(len(prompt), 1)
            scored = torch.arange(first, len(tokens))
            if flat_index is None:
                positions.append(starts[row] + scored - 1)
            else:
                positions.append(torch.tensor(flat_index[row], dtype=torch.long)[scored - 1])
            targets.append(tokens[first:])
            pairs.append(torch.full_like(scored, pair))
            is_chosen.append(torch.full(scored.shape, chosen, dtype=torch.bool))
            is_response.append(scored >= len(prompt))
            sizes[-1] += len(scored)
    return ScoredTokens(
        positions=torch.cat(positions),
        targets=torch.cat(targets),
        pair=torch.cat(pairs),
        chosen=torch.cat(is_chosen),
        response=torch.cat(is_response),
        pair_sizes=tuple(sizes),
    )


def _finish(batch: dict, scored: ScoredTokens, features: list[dict], real_tokens: int) -> dict:
    """What every layout adds to its model inputs: the scored tokens, and the real, non-padding tokens laid
    out (for the ``padding_fraction`` metric); dataset row numbers, for error messages."""
    batch.update(scored.batch_fields())
    batch["num_tokens"] = torch.tensor(real_tokens, dtype=torch.long)
    if all("row_index" in feature for feature in features):
        batch["row_index"] = torch.tensor([feature["row_index"] for feature in features], dtype=torch.long)
    return batch


@dataclass
class PaddedPairCollator:
    """Chosen and rejected sequences of B pairs stacked as ``2B`` right-padded rows:
    rows ``0..B-1`` are ``prompt + chosen``, rows ``B..2B-1`` are ``prompt + rejected``, so one
    forward pass serves both."""

    pad_token_id: int
    nll_include_prompt: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = _pair_rows(features)
        seq_len = max(len(p) + len(r) for p, r, _, _ in rows)
        if self.pad_to_multiple_of:
            seq_len = -(-seq_len // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), seq_len), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
        for row, (prompt, response, _, _) in enumerate(rows):
            input_ids[row, : len(prompt) + len(response)] = torch.tensor(prompt + response, dtype=torch.long)
            attention_mask[row, : len(prompt) + len(response)] = 1
        starts = [row * seq_len for row in range(len(rows))]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        scored = _scored_tokens(rows, starts, self.nll_include_prompt)
        return _finish(batch, scored, features, sum(len(p) + len(r) for p, r, _, _ in rows))


@dataclass
class PackedPairCollator:
    """Padding-free: the 2B sequences packed into as few rows as fit, each row no longer than the
    longest sequence (first-fit decreasing), with ``position_ids`` restarting at 0 for each sequence
    and no attention mask; transformers then confines attention to each sequence (a block-causal mask
    for eager / sdpa / flex, variable-length kernels for flash attention). Rows no longer than the
    padded layout's keep attention cost at or below it; the only padding left is the tail of a row,
    laid out as a dummy sequence of its own that no real token attends to."""

    pad_token_id: int
    nll_include_prompt: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = _pair_rows(features)
        lengths = [len(p) + len(r) for p, r, _, _ in rows]
        width = max(lengths)
        bins = first_fit_decreasing(lengths, width)
        input_ids = torch.full((len(bins), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(bins), width), dtype=torch.long)
        starts = [0] * len(rows)
        for row, members in enumerate(bins):
            offset = 0
            for seq in members:
                prompt, response, _, _ = rows[seq]
                starts[seq] = row * width + offset
                input_ids[row, offset : offset + lengths[seq]] = torch.tensor(
                    prompt + response, dtype=torch.long
                )
                position_ids[row, offset : offset + lengths[seq]] = torch.arange(lengths[seq])
                offset += lengths[seq]
            position_ids[row, offset:] = torch.arange(width - offset)  # the tail: a dummy sequence
        batch = {"input_ids": input_ids, "position_ids": position_ids}
        return _finish(batch, _scored_tokens(rows, starts, self.nll_include_prompt), features, sum(lengths))


@dataclass
class SharedPrefixCollator:
    """Prompt prefix sharing: each pair laid out once as ``[prompt][chosen][rejected]``, so each prompt
    is processed once. ``position_ids`` of the rejected tokens continue from the prompt, as if chosen
    were not there, and ``segment_ids`` (:func:`orpo.layouts.segment_code` of unit and part, NO_SEGMENT
    padding) let the head runner build the attention mask: causal within a unit, except that rejected tokens
    do not see chosen ones. The first chosen and the first rejected token are both predicted by the last
    prompt token.

    One pair per row, or with ``pack`` the pairs packed first-fit decreasing into rows no longer than
    the longest pair (units never see each other: the mask is per unit)."""

    pad_token_id: int
    nll_include_prompt: bool = False
    pack: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [
            len(f["prompt_input_ids"]) + len(f["chosen_input_ids"]) + len(f["rejected_input_ids"])
            for f in features
        ]
        width = max(lengths)
        bins = (
            first_fit_decreasing(lengths, width) if self.pack else [[pair] for pair in range(len(features))]
        )
        return self.lay_out(features, bins, width)

    def lay_out(self, features: list[dict], bins: list[list[int]], width: int) -> dict[str, torch.Tensor]:
        """The batch with pairs ``bins[row]`` side by side in row ``row`` of ``width`` tokens."""
        rows = _pair_rows(features)  # chosen sequences first, then rejected, each with its prompt
        num_pairs = len(features)
        input_ids = torch.full((len(bins), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(bins), width), dtype=torch.long)
        segment_ids = torch.full((len(bins), width), NO_SEGMENT, dtype=torch.long)
        # Where each of the 2B sequences' tokens sit in the flat [rows * width] layout, token by token.
        flat_index: list[list[int]] = [[] for _ in rows]
        for row, members in enumerate(bins):
            offset = 0
            for unit, pair in enumerate(members):
                prompt, chosen, rejected = (
                    list(features[pair][k])
                    for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
                )
                p, c, r = len(prompt), len(chosen), len(rejected)
                span = slice(offset, offset + p + c + r)
                input_ids[row, span], position_ids[row, span], segment_ids[row, span] = shared_prefix_unit(
                    prompt, chosen, rejected, unit
                )
                base = row * width + offset
                flat_index[pair] = [base + t for t in range(p + c)]
                flat_index[num_pairs + pair] = [base + t for t in range(p)] + [
                    base + p + c + t for t in range(r)
                ]
                offset += p + c + r
        batch = {"input_ids": input_ids, "position_ids": position_ids, "segment_ids": segment_ids}
        scored = _scored_tokens(rows, None, self.nll_include_prompt, flat_index)
        return _finish(batch, scored, features, int((segment_ids != NO_SEGMENT).sum()))


def collator_for(layout: Layout, pad_token_id: int, nll_include_prompt: bool):
    """The collator that lays batches out in ``layout``."""
    if layout.shared:
        return SharedPrefixCollator(pad_token_id, nll_include_prompt, pack=layout.packed)
    if layout.packed:
        return PackedPairCollator(pad_token_id, nll_include_prompt)
    return PaddedPairCollator(pad_token_id, nll_include_prompt)


# The batch fields the head and the loss read (orpo.scored).
SCORED_FIELDS = {*FIELDS.values(), "num_pairs"}


def check_collator(collator, row: dict) -> None:
    """A collator passed to the trainer must lay out the scored fields; one written for TRL's trainer (e.g.
    DPODataCollatorWithPadding) does not, so it is refused before training, in one line, instead of a
    KeyError at the first step. ``row`` is a tokenized pair."""
    try:
        missing = sorted(SCORED_FIELDS - set(collator([row])))
    except Exception as err:  # noqa: BLE001 - any failure on a tokenized pair is the same mismatch
        missing = [f"(it failed on a tokenized pair: {type(err).__name__}: {err})"]
    if missing:
        raise OrpoError(
            f"data_collator {type(collator).__name__} does not lay out batches for orpo's loss (missing "
            f"{', '.join(missing)}); leave data_collator unset: orpo lays out its batches itself (padded, packed "
            "or prompt-shared rows, see 'Batch layouts'), or use a collator of orpo.data.collator"
        )
