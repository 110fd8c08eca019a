"""Token-budget batching: micro-batches of as many pairs as fit in ``max_tokens_per_batch`` tokens (padding
included, as the batch layout lays them out), grouped by length so a batch of short pairs and a batch
of long pairs cost about the same and little is padded.

The batches are fixed for the run (pairs sorted by length, each batch the most of them that fit the
budget, found by bisecting the count); each epoch visits them in a new order drawn from the seed and
the epoch, so the number of batches per epoch never changes and a resumed run replays the same order.
With several processes each takes every N-th batch of that order (the last round wraps around to the
start), so all take the same number of steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import pyarrow.compute as pc
import torch
from datasets import Dataset

from orpo.data.tokenize import ROW_INDEX, TOKENIZED_COLUMNS
from orpo.errors import OrpoError

# (prompt, chosen, rejected) token counts of one pair.
PairLengths = tuple[int, int, int]


def pair_lengths(dataset: Dataset) -> list[PairLengths]:
    """Token counts of every pair of a tokenized dataset, read from the Arrow columns (no row decoding)."""
    table = dataset.select_columns(list(TOKENIZED_COLUMNS)).with_format("arrow")[:]
    columns = [pc.list_value_length(table.column(name)).to_pylist() for name in TOKENIZED_COLUMNS]
    return list(zip(*columns, strict=True))


def with_pair_lengths(dataset, column: str):
    """``dataset`` with each pair's tokens (prompt + chosen + rejected) in ``column``, where Trainer's
    length-grouped samplers look for a row's length (they would measure ``input_ids``, which pairs have not);
    anything else, or a dataset that has the column, as it is."""
    if not isinstance(dataset, Dataset) or column in dataset.column_names:
        return dataset
    return dataset.add_column(column, [sum(pair) for pair in pair_lengths(dataset)])


class _EpochSeed:
    """The epoch the order is drawn for. Kept as ``.sampler`` because that is where accelerate's
    data loader looks for ``set_epoch`` behind its per-process wrapper."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class TokenBudgetBatchSampler:
    """Batches of dataset indices whose batch layout holds at most ``max_tokens`` tokens.

    Args:
        lengths: ``(prompt, chosen, rejected)`` token counts per pair.
        max_tokens: the budget per micro-batch, padding included.
        batch_tokens: tokens the batch layout processes for a list of pairs (see
            :meth:`orpo.layouts.Layout.batch_tokens`).
        seed: the order of batches in epoch ``e`` is drawn from ``seed + e``.
        num_processes / process_index: data-parallel sharding; this process yields every
            ``num_processes``-th batch starting at ``process_index``.
        source / row_index: the dataset and its rows' original indices, named in the error when one
            pair alone exceeds the budget.
    """

    def __init__(
        self,
        lengths: Sequence[PairLengths],
        max_tokens: int,
        batch_tokens: Callable[[list[PairLengths]], int],
        seed: int = 0,
        num_processes: int = 1,
        process_index: int = 0,
        source: str = "train_dataset",
        row_index: Sequence[int] | None = None,
    ):
        self.seed, self.num_processes, self.process_index = seed, num_processes, process_index
        self.sampler = _EpochSeed()
        self.batches = self._cut(lengths, max_tokens, batch_tokens, source, row_index)

    @staticmethod
    def _cut(lengths, max_tokens, batch_tokens, source, row_index) -> list[list[int]]:
        # Longest first: the first pair of a batch sets its width, the rest are no longer.
        order = sorted(range(len(lengths)), key=lambda i: (-sum(lengths[i]), i))
        for index in order:
            needed = batch_tokens([lengths[index]])
            if needed > max_tokens:
                raise OrpoError(
                    f"max_tokens_per_batch={max_tokens} is smaller than row {row_index[index] if row_index else index} of {source}, which takes "
                    f"{needed} tokens on its own in this batch layout; raise max_tokens_per_batch to at least "
                    f"{needed} or lower max_length"
                )

        def fits(start: int, count: int) -> bool:
            return batch_tokens([lengths[i] for i in order[start : start + count]]) <= max_tokens

        # Each batch takes the most pairs that fit, found by doubling then bisecting the count (a batch's
        # tokens grow with its pairs): O(log k) layout evaluations per batch of k pairs instead of k.
        batches: list[list[int]] = []
        start = 0
        while start < len(order):
            remaining = len(order) - start
            fit, step = 1, 1  # `fit` pairs fit
            while fit < remaining and fits(start, min(fit + step, remaining)):
                fit = min(fit + step, remaining)
                step *= 2
            high = min(fit + step, remaining + 1)  # does not fit, or is past the end
            while high - fit > 1:
                middle = (fit + high) // 2
                fit, high = (middle, high) if fits(start, middle) else (fit, middle)
            batches.append(order[start : start + fit])
            start += fit
        return batches

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return math.ceil(len(self.batches) / self.num_processes)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.sampler.epoch)
        order = torch.randperm(len(self.batches), generator=generator).tolist()
        rounds = len(self)
        order += order[: rounds * self.num_processes - len(order)]  # every process the same count
        for step in range(rounds):
            yield self.batches[order[step * self.num_processes + self.process_index]]


def token_budget_loader(dataset: Dataset, collator, layout, args, accelerator):
    """The training loader for ``args.max_tokens_per_batch``: a :class:`TokenBudgetBatchSampler` over the
    pairs as ``layout`` lays them out (its ``batch_tokens``), prepared by ``accelerator``. The sampler is
    already split across processes, so accelerate's own per-process split is turned into a pass-through."""
    from functools import partial

    from torch.utils.data import DataLoader
    from transformers.trainer_utils import seed_worker

    sampler = TokenBudgetBatchSampler(
        pair_lengths(dataset),
        args.max_tokens_per_batch,
        layout.batch_tokens,
        seed=args.seed,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        row_index=dataset[ROW_INDEX] if ROW_INDEX in dataset.column_names else None,
    )
    workers = args.dataloader_num_workers
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=workers,
        pin_memory=args.dataloader_pin_memory,
        persistent_workers=args.dataloader_persistent_workers,
        worker_init_fn=partial(seed_worker, num_workers=workers, rank=args.process_index),
    )
    loader = accelerator.prepare(loader)
    shard = getattr(loader, "batch_sampler", None)
    if shard is not sampler and getattr(shard, "batch_sampler", None) is sampler:
        shard.num_processes, shard.process_index = 1, 0
    return loader
