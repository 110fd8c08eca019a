"""orpo.guards: the multi-process launch guard, the non-finite loss policy, stop signals and the clean exit (the multi-process runs
themselves are in test_distributed.py)."""

import json
import math

import pytest
import torch

from conftest import make_model, padded_args
from orpo import ORPOConfig, ORPOTrainer
from orpo.errors import OrpoError
from orpo.guards import launched_processes, require_distributed_launch

config = padded_args


def test_one_of_several_launched_processes_must_not_train_alone(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_processes() == 4
    require_distributed_launch(4)  # one data-parallel job of 4: fine
    with pytest.raises(OrpoError, match="one of 4 started by the launcher .* runs as 1 process") as err:
        require_distributed_launch(1)
    assert "use_cpu: true" in str(err.value)


def test_a_single_process_is_never_stopped(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_processes() == 1
    require_distributed_launch(1)


def poison_training_forward(model, at_call):
    """Make the final norm's output NaN on the ``at_call``-th training forward pass."""
    calls = []

    def hook(module, args, output):
        if not module.training:
            return None
        calls.append(1)
        return output * float("nan") if len(calls) == at_call else None

    return model.model.norm.register_forward_hook(hook)


def test_non_finite_loss_stops_with_step_rows_and_a_checkpoint(tmp_path, tokenizer, toy_dataset, monkeypatch):
    from orpo.errors import OrpoError

    model = make_model(seed=2)
    trainer = ORPOTrainer(
        model=model,
        args=config(tmp_path, max_steps=5, per_device_train_batch_size=4),
        train_dataset=toy_dataset,
        tokenizer=tokenizer,
    )
    seen_rows = []
    real = ORPOTrainer.compute_loss
    monkeypatch.setattr(
        ORPOTrainer,
        "compute_loss",
        lambda self, m, inputs, *a, **k: (
            seen_rows.append(inputs["row_index"].tolist()) or real(self, m, inputs, *a, **k)
        ),
    )
    poison_training_forward(model, at_call=3)
    with pytest.raises(OrpoError, match=r"non-finite loss \(nan\) at step 3, dataset rows \[") as err:
        trainer.train()
    assert str(seen_rows[-1]) in str(err.value)  # the rows of the poisoned batch
    assert "checkpoint-2" in str(err.value)
    saved = tmp_path / "out" / "checkpoint-2"
    assert (saved / "model.safetensors").is_file()
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == 2


def test_nan_policy_skip_leaves_the_batch_out_and_counts_it(tmp_path, tokenizer, toy_dataset):
    model = make_model(seed=2)
    trainer = ORPOTrainer(
        model=model,
        args=config(tmp_path, max_steps=5, per_device_train_batch_size=4, nan_policy="skip"),
        train_dataset=toy_dataset,
        tokenizer=tokenizer,
    )
    poison_training_forward(model, at_call=3)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 5
    assert [h.get("nan_skipped_batches", 0) for h in logged] == [0, 0, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(torch.tensor(h["rewards/accuracies"])) for h in logged if h["step"] != 3)


def test_nan_policy_is_validated():
    from orpo.errors import OrpoError

    with pytest.raises(OrpoError, match="nan_policy must be 'error' or 'skip'"):
        ORPOConfig(output_dir="x", nan_policy="ignore")


def test_a_diverging_run_stops_or_warns_as_nan_policy_says(tmp_path, capsys, caplog):
    """learning_rate 10 on the demo: the loss climbs from ~5.6 to thousands but stays finite, so the
    non-finite guard never fired and the run ended with 'model saved' and exit 0."""
    from conftest import demo_train_argv
    from orpo.cli import main

    base = dict(
        max_steps=12, learning_rate=10, activation_checkpointing="false", per_device_train_batch_size=4
    )
    assert main(demo_train_argv(tmp_path / "error", **base)) == 1
    err = capsys.readouterr().err
    assert "the loss diverged" in err and "checkpoint-1" in err
    assert (tmp_path / "error" / "checkpoint-1" / "model.safetensors").is_file()
    assert not (tmp_path / "error" / "model.safetensors").exists()  # no finished-looking run
    with caplog.at_level("WARNING", logger="orpo"):
        assert main(demo_train_argv(tmp_path / "skip", **base, nan_policy="skip")) == 0
    assert "the loss diverged" in caplog.text and "training on (nan_policy: skip)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="orpo"):
        assert main(demo_train_argv(tmp_path / "off", **base, divergence_factor="null")) == 0
    assert "diverged" not in caplog.text


def test_the_divergence_baseline_is_not_fooled_by_one_easy_batch():
    """Issue 31 item 5: a healthy run whose first batch is easy (0.29, then ~9.4: 32x; SmolLM2's vocabulary,
    a uniform guess costs ln 49152 = 10.8) is not stopped; the demo at learning rate 10 is, at step 2."""
    from orpo.guards import Divergence

    healthy = Divergence(10.0, floor=math.log(49152) + 0.1 * math.log(2))
    losses = [0.29, 9.41, 9.0, 9.3, 0.5, 9.8, 8.7]
    assert all(healthy.observe(loss, step) is None for step, loss in enumerate(losses, 1))
    exploding = Divergence(10.0, floor=math.log(259) + 0.1 * math.log(2))
    said = [exploding.observe(loss, step) for step, loss in enumerate([5.65, 1679.0, 2.1e4], 1)]
    assert said[0] is None and said[1].startswith("the loss diverged: 1679 at step 2, 297x")
    late = Divergence(10.0, floor=1.0)  # a healthy start, then an explosion: the median of the earlier steps
    said = [late.observe(loss, step) for step, loss in enumerate([3.0, 2.8, 2.9, 2.7, 40.0], 1)]
    assert said[:4] == [None] * 4 and "the median of the earlier steps' losses (2.85)" in said[4]
    assert Divergence(None).observe(1e9, 5) is None


@pytest.fixture(scope="module")
def easy_row_model(tmp_path_factory):
    """The tiny model after learning one row by heart: that row's loss ~20x below any other row's."""
    from datasets import Dataset

    from orpo.demo import demo_tokenizer

    model = make_model()
    args = padded_args(
        tmp_path_factory.mktemp("easy"), max_steps=40, per_device_train_batch_size=4, learning_rate=5e-3
    )
    ORPOTrainer(
        model=model, args=args, train_dataset=Dataset.from_list([EASY_ROW] * 8), tokenizer=demo_tokenizer()
    ).train()
    return model


EASY_ROW = {"prompt": "q", "chosen": "aaaa", "rejected": "b"}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_healthy_runs_with_uneven_batches_are_never_stopped(tmp_path, seed, easy_row_model, caplog):
    """Issue 31 item 5: batches of very different difficulty (three in four are the row the model knows by
    heart, so most runs start on an easy batch, the rest are new text) at a learning rate that barely moves
    the weights: the step losses swing ~20x, and no run is called diverged (the old rule, 10x the first
    step's loss, stopped them)."""
    import copy

    from datasets import Dataset

    from orpo.demo import demo_tokenizer

    hard = [
        {"prompt": f"question {i}?", "chosen": f"answer {i} is {i * 7}", "rejected": "no"} for i in range(12)
    ]
    rows = [EASY_ROW] * 36 + hard
    args = padded_args(tmp_path, max_steps=12, per_device_train_batch_size=1, learning_rate=1e-6, seed=seed)
    trainer = ORPOTrainer(
        model=copy.deepcopy(easy_row_model),
        args=args,
        train_dataset=Dataset.from_list(rows),
        tokenizer=demo_tokenizer(),
    )
    with caplog.at_level("WARNING", logger="orpo"):
        trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and "diverged" not in caplog.text
    assert max(losses) / min(losses) > 10  # uneven indeed: the old rule's factor
