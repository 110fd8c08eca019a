"""What a batch scores: the tokens whose log-probs the loss needs, described the same way whatever batch
layout (padded, packed, shared prefix) the collator chose, so neither the head nor the loss knows the layout.

A collator builds a :class:`ScoredTokens`; it travels inside the batch as plain fields (:meth:`batch_fields`:
``score_*`` tensors, ``num_pairs``, and ``pair_sizes`` as host ints), because Trainer and accelerate move,
gather and split dicts of tensors, not objects of ours; the trainer reads it back with :meth:`from_batch`.
These two methods are the only places that spell the field names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The batch fields, by attribute: the loss's inputs, and what the head reads (positions, targets).
FIELDS = {
    "positions": "score_positions",
    "targets": "score_targets",
    "pair": "score_pair",
    "chosen": "score_chosen",
    "response": "score_response",
}


@dataclass(frozen=True)
class ScoredTokens:
    """The ``N`` scored tokens of a batch of ``P`` pairs, ordered pair by pair (each pair's tokens contiguous,
    so the head can work on chunks of whole pairs).

    - ``positions [N]`` long: flat index (``row * width + t``) of the hidden state that predicts the token;
    - ``targets [N]`` long: the token id predicted;
    - ``pair [N]`` long: the pair (row of preference data, ``0..P-1``) the token belongs to;
    - ``chosen [N]`` bool: of the chosen (True) or the rejected (False) sequence;
    - ``response [N]`` bool: a response token (True) or a chosen prompt token (False: scored for the NLL term
      only, when ``nll_include_prompt``);
    - ``pair_sizes``: scored tokens per pair as host ints (``P`` of them), for planning without a device sync.
    """

    positions: torch.Tensor
    targets: torch.Tensor
    pair: torch.Tensor
    chosen: torch.Tensor
    response: torch.Tensor
    pair_sizes: tuple[int, ...]

    @property
    def num_pairs(self) -> int:
        return len(self.pair_sizes)

    @classmethod
    def from_batch(cls, batch: dict) -> ScoredTokens:
        """The scored tokens of a collated batch; ``pair_sizes`` counted (a host sync) if the batch lacks them."""
        fields = {name: batch[key] for name, key in FIELDS.items()}
        sizes = batch.get("pair_sizes")
        if not sizes:  # another collator: counted, in one host sync
            num_pairs = batch["num_pairs"].reshape(1).to(fields["pair"].device)
            counted = torch.cat([num_pairs, torch.bincount(fields["pair"])]).tolist()
            sizes = (counted[1:] + [0] * counted[0])[: counted[0]]
        return cls(**fields, pair_sizes=tuple(sizes))

    @staticmethod
    def step_counts(batch: dict) -> torch.Tensor:
        """``[chosen tokens (the NLL's), pairs]`` of a collated batch, as a tensor where the batch is (no host
        sync): what the trainer sums over an optimizer step's micro-batches to normalise the loss."""
        chosen = batch[FIELDS["chosen"]]
        return torch.stack([chosen.sum(), batch["num_pairs"].reshape(()).to(chosen.device)])

    def batch_fields(self) -> dict:
        """The fields a collator puts in its batch."""
        fields = {key: getattr(self, name) for name, key in FIELDS.items()}
        fields["num_pairs"] = torch.tensor(self.num_pairs, dtype=torch.long)
        fields["pair_sizes"] = self.pair_sizes  # a tuple: it stays on the host when the batch moves
        return fields

    def of_pairs(self, first: int, end: int, start_token: int, end_token: int) -> ScoredTokens:
        """Pairs ``first..end-1`` alone (their tokens are ``start_token:end_token``), numbered from 0."""
        return ScoredTokens(
            positions=self.positions[start_token:end_token],
            targets=self.targets[start_token:end_token],
            pair=self.pair[start_token:end_token] - first,
            chosen=self.chosen[start_token:end_token],
            response=self.response[start_token:end_token],
            pair_sizes=self.pair_sizes[first:end],
        )
