"""Token-budget batching: every batch fits the budget in its layout, every pair is seen once per epoch,
batches are length-grouped, the order is a function of seed and epoch, and processes split the work."""

import random

import pytest
import torch
from datasets import Dataset

from conftest import make_model, orpo_args, toy_rows
from orpo import ORPOConfig, ORPOTrainer
from orpo.data.batching import TokenBudgetBatchSampler, pair_lengths
from orpo.data.collator import collator_for
from orpo.errors import OrpoError
from orpo.layouts import Layout

LAYOUTS = [Layout(), Layout(packed=True), Layout(shared=True), Layout(packed=True, shared=True)]


def config(tmp_path, **kwargs):
    return orpo_args(tmp_path, **kwargs)


def random_lengths(n=300, seed=0):
    rng = random.Random(seed)
    return [(rng.randint(1, 120), rng.randint(1, 40), rng.randint(1, 40)) for _ in range(n)]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.description)
def test_batches_fit_the_budget_and_cover_every_pair_once(layout):
    lengths = random_lengths()
    sampler = TokenBudgetBatchSampler(lengths, 1024, layout.batch_tokens, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    costs = [layout.batch_tokens([lengths[i] for i in batch]) for batch in batches]
    assert max(costs) <= 1024
    # greedy and length-grouped: batches are mostly full, far fuller than random batches of equal count
    assert sum(costs) / len(costs) > 0.6 * 1024
    shuffled = list(range(len(lengths)))
    random.Random(0).shuffle(shuffled)
    size = -(-len(lengths) // len(batches))
    random_costs = [
        layout.batch_tokens([lengths[i] for i in shuffled[k : k + size]])
        for k in range(0, len(lengths), size)
    ]
    assert sum(costs) < sum(random_costs)


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.description)
def test_each_batch_takes_the_most_pairs_that_fit(layout):
    """A batch's pairs are a run of the longest-first order, and one more pair would not fit (the cut
    bisects the count; for layouts whose tokens only grow with pairs that is the greedy cut)."""
    lengths = random_lengths(seed=1)
    sampler = TokenBudgetBatchSampler(lengths, 2048, layout.batch_tokens)
    order = [i for batch in sampler.batches for i in batch]
    assert order == sorted(range(len(lengths)), key=lambda i: (-sum(lengths[i]), i))
    start = 0
    for batch in sampler.batches[:-1]:
        one_more = [lengths[i] for i in order[start : start + len(batch) + 1]]
        assert layout.batch_tokens(one_more) > 2048
        start += len(batch)


def test_short_pairs_make_bigger_batches():
    lengths = [(4, 2, 2)] * 50 + [(100, 20, 20)] * 50
    sampler = TokenBudgetBatchSampler(lengths, 2000, Layout(shared=True).batch_tokens)
    long_only = [b for b in sampler.batches if all(i >= 50 for i in b)]
    short_only = [b for b in sampler.batches if all(i < 50 for i in b)]
    assert {len(b) for b in long_only} == {2000 // 140}  # 14 pairs of 140 tokens
    assert len(short_only) == 1 and len(short_only[0]) > 40  # every short pair left fits one batch


def test_batch_tokens_match_what_the_collators_lay_out(tokenizer):
    from datasets import Dataset

    rows = Dataset.from_list(
        [
            {"prompt": "p" * n, "chosen": "c" * m, "rejected": "r" * k}
            for n, m, k in [(3, 2, 5), (40, 1, 3), (1, 30, 2)]
        ]
    )
    from orpo.data.tokenize import TruncationLimits, tokenize_dataset

    tokenized, _ = tokenize_dataset(rows, tokenizer, TruncationLimits(None, None, None))
    lengths = pair_lengths(tokenized)
    features = [tokenized[i] for i in range(3)]
    for layout in LAYOUTS:
        batch = collator_for(layout, 0, False)(features)
        assert layout.batch_tokens(lengths) == batch["input_ids"].numel(), layout


def test_order_depends_on_seed_and_epoch_only():
    lengths = random_lengths()
    a = TokenBudgetBatchSampler(lengths, 800, Layout().batch_tokens, seed=1)
    b = TokenBudgetBatchSampler(lengths, 800, Layout().batch_tokens, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first and sorted(map(sorted, a)) == sorted(
        map(sorted, first)
    )  # same batches, new order
    a.set_epoch(0)
    assert list(a) == first


@pytest.mark.parametrize("processes", [2, 3])
def test_processes_split_the_batches_evenly(processes):
    lengths = random_lengths(101)
    whole = TokenBudgetBatchSampler(lengths, 700, Layout().batch_tokens, seed=2)
    shards = [
        list(
            TokenBudgetBatchSampler(
                lengths, 700, Layout().batch_tokens, seed=2, num_processes=processes, process_index=k
            )
        )
        for k in range(processes)
    ]
    assert len({len(shard) for shard in shards}) == 1  # the same number of steps everywhere (or DDP hangs)
    seen = [tuple(batch) for step in zip(*shards, strict=True) for batch in step]
    assert set(seen) == {tuple(batch) for batch in whole}  # every batch is taken, wrap-around aside


def test_a_pair_over_the_budget_is_a_clear_error():
    with pytest.raises(
        OrpoError, match=r"max_tokens_per_batch=50 is smaller than row 1 of train_dataset.*takes 320 "
    ):
        TokenBudgetBatchSampler([(5, 5, 5), (100, 50, 60)], 50, Layout().batch_tokens)


def test_training_with_a_token_budget(tmp_path, tokenizer):
    dataset = Dataset.from_list(toy_rows(40, seed=7))
    args = config(tmp_path, max_tokens_per_batch=120, num_train_epochs=2, logging_steps=1)
    trainer = ORPOTrainer(model=make_model(), args=args, train_dataset=dataset, tokenizer=tokenizer)
    loader = trainer.get_train_dataloader()
    batches = list(loader)
    assert sum(int(b["num_pairs"]) for b in batches) == 40
    assert max(b["input_ids"].numel() for b in batches) <= 120
    assert len({int(b["num_pairs"]) for b in batches}) > 1  # batch sizes follow the lengths
    trainer.train()
    assert trainer.state.global_step == 2 * len(loader)
    fractions = [h["padding_fraction"] for h in trainer.state.log_history if "padding_fraction" in h]
    assert fractions and all(0 <= f < 0.5 for f in fractions)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h)


def test_resuming_replays_the_same_batches(tmp_path, tokenizer):
    dataset = Dataset.from_list(toy_rows(40, seed=7))

    def run(out, max_steps, resume=None):
        args = ORPOConfig(
            output_dir=str(out),
            report_to="none",
            save_strategy="steps",
            save_steps=5,
            disable_tqdm=True,
            max_tokens_per_batch=120,
            max_steps=max_steps,
            learning_rate=1e-2,
            lr_scheduler_type="constant",  # the same schedule whether the run is told 5 or 12 steps
            logging_steps=1,
        )
        model = make_model(seed=2)
        trainer = ORPOTrainer(model=model, args=args, train_dataset=dataset, tokenizer=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    whole, _ = run(tmp_path / "whole", 12)  # crosses an epoch boundary (8-9 batches per epoch)
    run(tmp_path / "part", 5)
    resumed, _ = run(tmp_path / "part", 12, resume=str(tmp_path / "part" / "checkpoint-5"))
    for (name, a), b in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("strategy", ["group_by_length", "batch_rebalance"])
def test_trainer_length_grouped_sampling_works_on_preference_pairs(tmp_path, tokenizer, strategy):
    """Trainer's own length-aware samplers get the pairs' token counts (they would look for input_ids)."""
    args = config(tmp_path, max_steps=2, per_device_train_batch_size=4, train_sampling_strategy=strategy)
    dataset = Dataset.from_list(toy_rows(32, seed=3))
    trainer = ORPOTrainer(model=make_model(), args=args, train_dataset=dataset, tokenizer=tokenizer)
    lengths = [sum(pair) for pair in pair_lengths(trainer.train_dataset)]
    batches = [b["row_index"].tolist() for b in trainer.get_train_dataloader()]
    assert sorted(i for b in batches for i in b) == list(range(32))
    if (
        strategy == "group_by_length"
    ):  # each mega-batch is sorted longest first: the first batch holds the longest
        assert max(lengths[i] for i in batches[0]) == max(lengths)
    trainer.train()
    assert trainer.state.global_step == 2
