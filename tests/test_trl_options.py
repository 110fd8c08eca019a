"""TRL drop-in fidelity: a TRL script ports by changing the import, with TRL's defaults and no silent
difference. TRL's own trainer tests run in test_trl_orpo_trainer.py; here: the fields, defaults, argument order,
``beta``, ``trust_remote_code``, ``padding_value``, ``is_encoder_decoder``, ``generate_during_eval``, foreign
collators and the README's "Coming from TRL" list of every remaining difference.
"""

import dataclasses
import json
import sys
import types
from pathlib import Path

import pytest
import transformers
from datasets import Dataset
from transformers import T5Config, T5ForConditionalGeneration

from conftest import demo_train_argv, make_model, orpo_args, toy_rows
from orpo import ORPOConfig, ORPOTrainer
from orpo.errors import OrpoError
from orpo.generation import complete, publish_generations, sample_indices


def args(tmp_path, **kwargs):
    return orpo_args(tmp_path, **{"per_device_train_batch_size": 4, "seed": 0, **kwargs})


def test_every_trl_orpo_config_field_is_accepted(tmp_path):
    trl_orpo = pytest.importorskip("trl.experimental.orpo")
    ours = {f.name for f in dataclasses.fields(ORPOConfig)}
    theirs = {f.name for f in dataclasses.fields(trl_orpo.ORPOConfig)}
    assert theirs <= ours, sorted(theirs - ours)


# Where orpo's ORPOConfig defaults differ from TRL's, and why; the README's "Coming from TRL" table lists the
# same keys (test below). Field defaults (the dataclass) and resolved values (after construction) both count.
FIELD_DEFAULT_DIFFERENCES = {
    "beta": "unset until construction, then orpo_alpha's value (0.1 by default, as TRL's)",
    "gradient_checkpointing": "unset in the field, resolved to on (as TRL's) without transformers' deprecation warning",
}
RESOLVED_DIFFERENCES = {
    "bf16": "on where the device computes bf16 natively, a CPU with AVX512-BF16 or AMX included (TRL's is on, "
    "which fails on a CPU)",
    "use_cpu": "on when bf16 trains on a machine without an accelerator (transformers' CPU autocast needs it)",
    "dataloader_pin_memory": "off without CUDA: nothing to pin to",
}
README = Path(__file__).resolve().parents[1] / "README.md"


def _field_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.init:
            out[f.name] = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
    return out


def test_defaults_are_trls_except_the_listed_differences(tmp_path):
    trl_orpo = pytest.importorskip("trl.experimental.orpo")
    theirs, ours = _field_defaults(trl_orpo.ORPOConfig), _field_defaults(ORPOConfig)
    differ = {name for name in theirs if theirs[name] != ours[name]}
    assert differ == set(FIELD_DEFAULT_DIFFERENCES)
    trl_config = trl_orpo.ORPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False)
    config = ORPOConfig(output_dir=str(tmp_path), report_to="none")
    resolved = {name for name in theirs if getattr(trl_config, name) != getattr(config, name)}
    assert resolved <= set(RESOLVED_DIFFERENCES) and "dataloader_pin_memory" in resolved
    assert ("use_cpu" in resolved) is (config.bf16 and not config.fp16)  # bf16 on a CPU-only machine
    assert config.learning_rate == 1e-6 and config.logging_steps == 10 and config.remove_unused_columns
    assert config.activation_checkpointing and config.gradient_checkpointing


def test_readme_lists_every_difference_from_trl():
    section = README.read_text().split("## Coming from TRL", 1)[1].split("\n## ", 1)[0]
    for name in [*FIELD_DEFAULT_DIFFERENCES, *RESOLVED_DIFFERENCES, "max_prompt_length", "logits/chosen"]:
        assert f"`{name}`" in section, name
    assert "encoder-decoder" in section and "T5" in section


def test_trainer_takes_trls_arguments_in_trls_order():
    """A call written for TRL's positional order assigns the same things; orpo's extras are keyword-only."""
    import inspect

    trl_orpo = pytest.importorskip("trl.experimental.orpo")
    theirs = list(inspect.signature(trl_orpo.ORPOTrainer.__init__).parameters)
    ours = inspect.signature(ORPOTrainer.__init__).parameters
    assert list(ours)[: len(theirs)] == theirs
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in ours.items() if name not in theirs)


def test_beta_reads_the_same_value_as_orpo_alpha(tmp_path):
    assert ORPOConfig(output_dir=str(tmp_path)).beta == 0.1  # TRL code reads args.beta
    assert ORPOConfig(output_dir=str(tmp_path), beta=0.3).orpo_alpha == 0.3
    assert ORPOConfig(output_dir=str(tmp_path), orpo_alpha=0.7).beta == 0.7


def test_a_trl_collator_is_refused_at_construction(tmp_path, tokenizer):
    trl_utils = pytest.importorskip("trl.experimental.utils")
    collator = trl_utils.DPODataCollatorWithPadding(pad_token_id=tokenizer.pad_token_id)
    with pytest.raises(
        OrpoError, match="data_collator DPODataCollatorWithPadding does not lay out batches .* leave"
    ):
        ORPOTrainer(
            model=make_model(),
            args=args(tmp_path),
            train_dataset=Dataset.from_list(toy_rows(8)),
            tokenizer=tokenizer,
            data_collator=collator,
        )


# ---- trust_remote_code ------------------------------------------------------------------------------


@pytest.fixture
def saved_model(tmp_path, tokenizer):
    """A tiny model and the demo tokenizer saved to a directory, to load by path."""
    directory = tmp_path / "model"
    make_model().save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


@pytest.fixture
def remote_code_seen(monkeypatch):
    """The ``trust_remote_code`` each model and tokenizer load is given, in call order."""
    seen = []
    for auto_class in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = auto_class.from_pretrained

        def from_pretrained(name, *rest, _original=original, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return _original(name, *rest, **kwargs)

        monkeypatch.setattr(auto_class, "from_pretrained", from_pretrained)
    return seen


def test_trust_remote_code_reaches_the_model_and_tokenizer_loaders(tmp_path, saved_model, remote_code_seen):
    ORPOTrainer(model=str(saved_model), args=args(tmp_path), train_dataset=Dataset.from_list(toy_rows(8)))
    assert sorted(remote_code_seen) == [False, False]  # off unless asked for
    remote_code_seen.clear()
    config = args(tmp_path, trust_remote_code=True)
    assert config.model_init_kwargs == {"trust_remote_code": True}
    ORPOTrainer(model=str(saved_model), args=config, train_dataset=Dataset.from_list(toy_rows(8)))
    assert remote_code_seen == [True, True]


def test_orpo_train_passes_trust_remote_code_to_both_loaders(tmp_path, saved_model, remote_code_seen):
    from orpo.cli import main

    argv = demo_train_argv(tmp_path / "out", max_steps=1, save_strategy="no", trust_remote_code="true")
    argv[argv.index("demo")] = str(saved_model)
    assert main(argv) == 0
    assert remote_code_seen == [True, True]


def test_eval_generate_and_check_data_take_trust_remote_code(saved_model, remote_code_seen, capsys):
    from orpo.cli import main

    assert main(["eval", "--model", str(saved_model), "--data", "demo:test", "--json"]) == 0
    assert remote_code_seen == [False, False]
    remote_code_seen.clear()
    generate = ["generate", "--model", str(saved_model), "--prompt", "1+1=", "--max-new-tokens", "2"]
    assert main([*generate, "--no-chat-template", "--trust-remote-code"]) == 0
    assert remote_code_seen == [True, True]
    remote_code_seen.clear()
    assert main(["check-data", "demo:test", "--tokenizer", str(saved_model), "--trust-remote-code"]) == 0
    assert remote_code_seen == [True]


def test_trust_remote_code_and_model_init_kwargs_agree(tmp_path):
    assert args(tmp_path, model_init_kwargs={"trust_remote_code": True}).trust_remote_code is True
    with pytest.raises(OrpoError, match="model_init_kwargs sets trust_remote_code: false"):
        args(tmp_path, trust_remote_code=True, model_init_kwargs={"trust_remote_code": False})


# ---- padding_value ------------------------------------------------------------------------------


def test_padding_value_pads_batches_and_leaves_the_loss_unchanged(tmp_path, tokenizer):
    dataset = Dataset.from_list(toy_rows(8))

    def first_batch(**kwargs):
        trainer = ORPOTrainer(
            model=make_model(),
            args=args(tmp_path, padding_free=False, prefix_sharing=False, **kwargs),
            train_dataset=dataset,
            tokenizer=tokenizer,
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
        return batch, trainer.compute_loss(trainer.model, batch).item()

    default_batch, default_loss = first_batch()
    batch, loss = first_batch(padding_value=7)
    assert tokenizer.pad_token_id != 7
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["input_ids"][padding] == 7).all()
    assert (default_batch["input_ids"][padding] == tokenizer.pad_token_id).all()
    assert loss == pytest.approx(default_loss, rel=1e-6)


# ---- is_encoder_decoder -------------------------------------------------------------------------


def test_encoder_decoder_models_are_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(OrpoError, match="decoder-only causal language models"):
        args(tmp_path, is_encoder_decoder=True)
    assert args(tmp_path, is_encoder_decoder=False).is_encoder_decoder is False
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=300, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
    )
    with pytest.raises(OrpoError, match="T5ForConditionalGeneration is an encoder-decoder model"):
        ORPOTrainer(
            model=t5, args=args(tmp_path), train_dataset=Dataset.from_list(toy_rows(8)), tokenizer=tokenizer
        )


# ---- generate_during_eval -----------------------------------------------------------------------


def test_generate_during_eval_logs_the_same_prompts_at_each_evaluation(tmp_path, tokenizer):
    train, held_out = Dataset.from_list(toy_rows(16, seed=0)), Dataset.from_list(toy_rows(10, seed=1))
    trainer = ORPOTrainer(
        model=make_model(),
        args=args(
            tmp_path,
            generate_during_eval=True,
            per_device_eval_batch_size=3,
            max_completion_length=5,
            max_steps=4,
            eval_strategy="steps",
            eval_steps=2,
            learning_rate=1e-2,
        ),
        train_dataset=train,
        eval_dataset=held_out,
        tokenizer=tokenizer,
    )
    trainer.train()
    logged = [json.loads(line) for line in (tmp_path / "out" / "eval_generations.jsonl").open()]
    assert [row["step"] for row in logged] == [2, 2, 2, 4, 4, 4]
    assert {row["dataset"] for row in logged} == {"eval"}
    picked = sample_indices(len(held_out), 3, seed=0)
    prompts = [
        tokenizer.decode(trainer.eval_dataset[i]["prompt_input_ids"], skip_special_tokens=True)
        for i in picked
    ]
    assert [row["prompt"] for row in logged] == prompts * 2
    # the completions are the trained model's own greedy ones (the tiny model's generation config)
    model = trainer.model.eval()
    expected = complete(
        model,
        [trainer.eval_dataset[i]["prompt_input_ids"] for i in picked],
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_new_tokens=5,
    )
    assert [row["completion"] for row in logged[3:]] == tokenizer.batch_decode(
        expected, skip_special_tokens=True
    )
    assert any(row["completion"] for row in logged)


def test_named_eval_sets_get_generations_each(tmp_path, tokenizer):
    sets = {"a": Dataset.from_list(toy_rows(4, seed=1)), "b": Dataset.from_list(toy_rows(4, seed=2))}
    trainer = ORPOTrainer(
        model=make_model(),
        args=args(tmp_path, generate_during_eval=True, per_device_eval_batch_size=2, max_completion_length=3),
        train_dataset=Dataset.from_list(toy_rows(8)),
        eval_dataset=sets,
        tokenizer=tokenizer,
    )
    trainer.evaluate()
    logged = [json.loads(line) for line in (tmp_path / "out" / "eval_generations.jsonl").open()]
    assert [row["dataset"] for row in logged] == ["eval_a", "eval_a", "eval_b", "eval_b"]


def test_complete_left_pads_and_cuts_after_eos(tokenizer):
    model = make_model().eval()
    prompts = [[1, 5, 6, 7, 8, 9], [1, 5]]
    alone = [
        complete(model, [p], pad_token_id=0, eos_token_id=None, max_new_tokens=4, do_sample=False)[0]
        for p in prompts
    ]
    together = complete(model, prompts, pad_token_id=0, eos_token_id=None, max_new_tokens=4, do_sample=False)
    assert together == alone and all(len(c) == 4 for c in together)
    eos = alone[0][1]  # pretend the second new token is EOS: the completion ends there
    cut = complete(model, prompts[:1], pad_token_id=0, eos_token_id=eos, max_new_tokens=4, do_sample=False)[0]
    assert cut == alone[0][: alone[0].index(eos) + 1]


def test_generations_go_to_wandb_and_comet_tables_when_reporting_there(tmp_path, monkeypatch):
    logged, tables = [], []
    wandb = types.SimpleNamespace(
        run=object(),
        Table=lambda columns, data: ("table", columns, data),
        log=logged.append,
    )
    experiment = types.SimpleNamespace(log_table=lambda name, **kw: tables.append((name, kw)))
    comet = types.SimpleNamespace(get_running_experiment=lambda: experiment)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "comet_ml", comet)
    rows = [{"step": 1, "dataset": "eval", "prompt": "p", "completion": "c"}]
    publish_generations(rows, str(tmp_path), ["wandb", "comet_ml"], "game_log")
    assert logged == [{"game_log": ("table", ["Prompt", "Policy"], [["p", "c"]])}]
    assert tables == [("game_log.csv", {"tabular_data": [["p", "c"]], "headers": ["Prompt", "Policy"]})]
    publish_generations(rows, str(tmp_path), [], "game_log")  # not reporting there: the file only
    assert len(logged) == 1 and len(tables) == 1
    assert len((tmp_path / "eval_generations.jsonl").read_text().splitlines()) == 2


def test_old_scripts_read_the_tokenizer_as_trainer_tokenizer(tmp_path, tokenizer):
    """``trainer.tokenizer`` (TRL ≤ 0.11, transformers 4; gone from transformers 5's Trainer) is the
    processing class, so ``trainer.tokenizer.save_pretrained(...)`` in an old script still works."""
    trainer = ORPOTrainer(
        model=make_model(),
        args=args(tmp_path),
        train_dataset=Dataset.from_list(toy_rows(8)),
        tokenizer=tokenizer,
    )
    assert trainer.tokenizer is trainer.processing_class is tokenizer
