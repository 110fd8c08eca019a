"""orpo.guards: the multi-process launch guard, the non-finite loss policy, stop signals and the clean exit (the multi-process runs
themselves are in test_distributed.py)."""

import json

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
    assert "the loss diverged" in err and "x the first step's" in err and "checkpoint-1" in err
    assert (tmp_path / "error" / "checkpoint-1" / "model.safetensors").is_file()
    assert not (tmp_path / "error" / "model.safetensors").exists()  # no finished-looking run
    with caplog.at_level("WARNING", logger="orpo"):
        assert main(demo_train_argv(tmp_path / "skip", **base, nan_policy="skip")) == 0
    assert "the loss diverged" in caplog.text and "training on (nan_policy: skip)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="orpo"):
        assert main(demo_train_argv(tmp_path / "off", **base, divergence_factor="null")) == 0
    assert "diverged" not in caplog.text
