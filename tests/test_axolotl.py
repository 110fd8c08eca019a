"""An Axolotl ORPO config (``rl: orpo``) trains with ``orpo train`` as it is: its adapter, attention,
precision, tracker and per-epoch keys become ours (orpo.cli.axolotl), the rest are renames or notes."""

import json

import pytest
import yaml
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file

from conftest import make_model, toy_rows
from orpo.cli import main
from orpo.cli.run_config import resolve
from orpo.config import cpu_bf16_native
from orpo.errors import OrpoError, UsageError

# The shape of the ORPO configs Axolotl users write (its docs and examples), on the demo model.
AXOLOTL_ORPO = """
base_model: demo
rl: orpo
orpo_alpha: 0.1
chat_template: tokenizer_default
datasets:
  - path: {train}
    ds_type: json
    type: chat_template.argilla
test_datasets:
  - path: {held_out}
sequence_len: 256
micro_batch_size: 4
eval_batch_size: 4
gradient_accumulation_steps: 2
num_epochs: 1
max_steps: 2
optimizer: adamw_torch
lr_scheduler: cosine
learning_rate: 1e-3
train_on_inputs: false
bf16: auto
tf32: false
sdp_attention: true
gradient_checkpointing: true
warmup_steps: 1
evals_per_epoch: 2
saves_per_epoch: 1
logging_steps: 1
adapter: lora
lora_r: 4
lora_alpha: 8
lora_dropout: 0.0
lora_target_linear: true
wandb_project:
wandb_entity:
val_set_size: 0.0
special_tokens:
strict: false
output_dir: {out}
"""


@pytest.fixture
def axolotl_config(tmp_path):
    train, held_out = tmp_path / "train.jsonl", tmp_path / "held_out.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in toy_rows(16, seed=0)))
    held_out.write_text("".join(json.dumps(row) + "\n" for row in toy_rows(4, seed=1)))
    text = AXOLOTL_ORPO.format(train=train, held_out=held_out, out=tmp_path / "out")
    return yaml.safe_load(text), tmp_path


def test_an_axolotl_orpo_config_resolves_to_ours(axolotl_config):
    raw, tmp_path = axolotl_config
    run = resolve(raw)
    args = run.args
    assert run.model == {"name": "demo", "attn_implementation": "sdpa"}
    assert run.peft == {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}
    assert run.datasets == [{"path": str(tmp_path / "train.jsonl"), "weight": 1.0}]
    assert run.eval_datasets == [{"path": str(tmp_path / "held_out.jsonl"), "weight": 1.0}]
    assert run.chat_template is None and run.special_tokens is None and run.env == {}
    assert (args.max_length, args.max_prompt_length) == (256, 128)
    assert args.per_device_train_batch_size == 4 and args.per_device_eval_batch_size == 4
    assert args.optim.value == "adamw_torch" and args.lr_scheduler_type.value == "cosine"
    assert args.nll_include_prompt is False
    assert args.bf16 is (cpu_bf16_native() is not None)  # auto: the CPU's own bf16, where it has it
    assert args.activation_checkpointing is True  # gradient_checkpointing, transformers 5's new name
    # 2 evaluations per epoch over 1 epoch: every half of the training steps; one save per epoch
    assert args.eval_strategy.value == "steps" and args.eval_steps == 0.5
    assert args.save_strategy.value == "epoch"
    notes = "\n".join(run.notes)
    for key in ("rl", "strict", "sdp_attention", "adapter", "optimizer", "ds_type", "evals_per_epoch"):
        assert f"'{key}" in notes, key


def test_orpo_train_runs_an_axolotl_config(axolotl_config, capsys):
    raw, tmp_path = axolotl_config
    path = tmp_path / "axolotl.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--disable_tqdm", "true"]) == 0
    out = tmp_path / "out"
    assert set(load_file(str(out / "adapter_model.safetensors"))) and all(
        "lora_" in name for name in load_file(str(out / "adapter_model.safetensors"))
    )
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("eval_rewards/accuracies" in entry for entry in history)  # the test_datasets were evaluated


def test_trackers_qlora_and_attention_keys(tmp_path):
    run = resolve(
        {
            "base_model": "some/model",
            "datasets": "d.jsonl",
            "output_dir": str(tmp_path),
            "adapter": "qlora",
            "lora_target_modules": ["q_proj", "v_proj"],
            "flash_attention": True,
            "use_tensorboard": True,
            "wandb_project": "prefs",
            "wandb_name": "run-1",
            "wandb_log_model": False,
            "liger_rms_norm": True,
            "group_by_length": True,
        }
    )
    assert run.model == {
        "name": "some/model",
        "attn_implementation": "flash_attention_2",
        "load_in_4bit": True,
    }
    assert run.peft == {"target_modules": ["q_proj", "v_proj"]}
    assert run.args.report_to == ["tensorboard", "wandb"] and run.args.run_name == "run-1"
    assert run.env == {"WANDB_PROJECT": "prefs", "WANDB_LOG_MODEL": "false"}
    assert run.args.use_liger_kernel is True
    assert run.args.train_sampling_strategy == "group_by_length"


@pytest.mark.parametrize(
    "extra,message",
    [
        ({"adapter": "ia3"}, "adapter: 'ia3' is not supported"),
        ({"adapter": "lora", "peft": {"r": 4}}, "both 'adapter' .Axolotl. and a 'peft' block"),
        ({"flash_attention": True, "sdp_attention": True}, "choose one attention implementation"),
        ({"xformers_attention": True}, "xformers_attention is not supported"),
        ({"adapter": "qlora", "load_in_8bit": True}, "remove load_in_8bit"),
        ({"evals_per_epoch": 2, "eval_steps": 5, "eval_datasets": "e.jsonl"}, "give one of evals_per_epoch"),
        ({"special_tokens": ["<pad>"]}, "'special_tokens' must map token names to tokens"),
        ({"rl": "dpo"}, "'rl: dpo' asks for another method"),
        ({"pref_loss": "sigmoid"}, "'pref_loss: sigmoid' asks for another method"),
        ({"stage": "dpo"}, "'stage: dpo' without 'pref_loss: orpo' is DPO"),
    ],
)
def test_axolotl_keys_we_cannot_honour_are_errors(tmp_path, extra, message):
    with pytest.raises(UsageError, match=message):
        resolve({"base_model": "m", "datasets": "d.jsonl", "output_dir": str(tmp_path), **extra})


def test_every_unknown_key_is_reported_at_once(tmp_path):
    with pytest.raises(UsageError) as info:
        resolve(
            {"model": "m", "datasets": "d.jsonl", "learning_rat": 1, "early_stopping_patiense": 3, "zzz": 1}
        )
    message = str(info.value)
    assert message.startswith("unknown config keys 'learning_rat' (did you mean 'learning_rate'?)")
    assert "'early_stopping_patiense'" in message and "'zzz'" in message


def test_a_dataset_entry_takes_its_own_split_and_data_files(tmp_path, tokenizer):
    """A per-source ``split`` was accepted but dropped before; Axolotl's ``data_files`` are the sources."""
    saved = tmp_path / "dict"
    DatasetDict(
        {
            "train": Dataset.from_list(toy_rows(6, seed=0)),
            "validation": Dataset.from_list(toy_rows(3, seed=1)),
        }
    ).save_to_disk(str(saved))
    from orpo.data import read_pairs

    dataset = read_pairs([{"path": str(saved), "split": "validation"}]).dataset
    assert len(dataset) == 3
    files = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for k, path in enumerate(files):
        path.write_text("".join(json.dumps(row) + "\n" for row in toy_rows(2 + k, seed=k)))
    run = resolve(
        {
            "model": "m",
            "datasets": [
                {"path": "json", "data_files": [str(f) for f in files]},
                {"path": str(saved), "split": "validation"},
            ],
        }
    )
    assert run.datasets == [
        {"path": str(files[0]), "weight": 1.0},
        {"path": str(files[1]), "weight": 1.0},
        {"path": str(saved), "weight": 1.0, "split": "validation"},
    ]
    dataset = read_pairs(run.datasets).dataset
    assert len(dataset) == 2 + 3 + 3


def test_trainer_setting_errors_are_one_line_orpo_errors(tmp_path, capsys):
    with pytest.raises(OrpoError, match="invalid training settings: .*eval_dataset"):
        resolve_and_build(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: demo\ndatasets: demo:test\neval_strategy: steps\noutput_dir: {tmp_path / 'o'}\n"
    )
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    assert "invalid training settings" in err and "Traceback" not in err


def resolve_and_build(tmp_path):
    from orpo import ORPOTrainer
    from orpo.demo import demo_tokenizer, tiny_model

    run = resolve(
        {"model": "demo", "datasets": "demo:test", "eval_strategy": "steps", "output_dir": str(tmp_path)}
    )
    return ORPOTrainer(
        model=tiny_model(), args=run.args, train_dataset=run.datasets, tokenizer=demo_tokenizer()
    )


def test_val_set_size_holds_out_seeded_training_pairs_for_evaluation(tmp_path, tokenizer):
    from orpo import ORPOConfig, ORPOTrainer

    def trainer(size, **kwargs):
        return ORPOTrainer(
            model=make_model(),
            args=ORPOConfig(output_dir=str(tmp_path), report_to="none", val_set_size=size, **kwargs),
            train_dataset=Dataset.from_list(toy_rows(20)),
            tokenizer=tokenizer,
        )

    fraction, count = trainer(0.25), trainer(3)
    assert (len(fraction.train_dataset), len(fraction.eval_dataset)) == (15, 5)
    assert (len(count.train_dataset), len(count.eval_dataset)) == (17, 3)
    held_out = set(fraction.eval_dataset["row_index"])  # rows keep their source row numbers
    assert held_out.isdisjoint(fraction.train_dataset["row_index"])
    assert held_out | set(fraction.train_dataset["row_index"]) == set(range(20))
    assert set(trainer(0.25).eval_dataset["row_index"]) == held_out  # seeded
    assert set(trainer(0.25, seed=1).eval_dataset["row_index"]) != held_out
    assert "eval_rewards/accuracies" in fraction.evaluate()
    with pytest.raises(OrpoError, match="val_set_size or an eval_dataset, not both"):
        ORPOTrainer(
            model=make_model(),
            args=ORPOConfig(output_dir=str(tmp_path), report_to="none", val_set_size=0.25),
            train_dataset=Dataset.from_list(toy_rows(8)),
            eval_dataset=Dataset.from_list(toy_rows(4)),
            tokenizer=tokenizer,
        )
    with pytest.raises(OrpoError, match="holds out 20 of 20 training pairs"):
        trainer(20)


def test_axolotl_val_set_size_with_evals_per_epoch(tmp_path):
    run = resolve({"base_model": "m", "datasets": "d.jsonl", "val_set_size": 0.05, "evals_per_epoch": 1})
    assert run.args.val_set_size == 0.05 and run.args.eval_strategy.value == "epoch"


def test_wandb_variables_are_set_when_the_run_starts_not_while_reading_the_config(
    tmp_path, monkeypatch, capsys
):
    """An Axolotl config's W&B settings become environment variables for the run's trackers; a config refused
    before the run starts (here: its output_dir is a file) leaves the process environment as it was."""
    import os

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    (tmp_path / "taken").write_text("a file")
    config = tmp_path / "axolotl.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "base_model": "demo",
                "datasets": [{"path": "demo:test"}],
                "wandb_project": "prefs",
                "output_dir": str(tmp_path / "taken"),
            }
        )
    )
    assert main(["train", str(config)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert "WANDB_PROJECT" not in os.environ
