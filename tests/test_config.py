import re

import pytest
from transformers import TrainingArguments

from conftest import BAD_OPTION_VALUES
from orpo import ORPOConfig, ORPOTrainer
from orpo.config import cpu_bf16_native
from orpo.errors import OrpoError


def test_defaults_run_on_cpu(tmp_path):
    config = ORPOConfig(output_dir=str(tmp_path))
    assert config.orpo_alpha == 0.1 and config.orpo_beta == 1.0
    # bf16 where the CPU computes it natively (tests/test_precision.py); TRL's bf16 default fails on a CPU
    assert config.bf16 is (cpu_bf16_native() is not None)
    assert (
        config.max_length == 1024 and config.max_prompt_length == 512 and config.max_completion_length is None
    )
    assert config.nll_include_prompt is True and config.disable_dropout is True  # TRL's objective (issue 27)
    assert isinstance(config, TrainingArguments)


def test_trl_beta_is_an_alias_of_orpo_alpha(tmp_path):
    assert ORPOConfig(output_dir=str(tmp_path), beta=0.25).orpo_alpha == 0.25
    assert ORPOConfig(output_dir=str(tmp_path), beta=0.25, orpo_alpha=0.25).orpo_alpha == 0.25
    with pytest.raises(OrpoError, match="orpo_alpha=0.5 and beta=0.25"):
        ORPOConfig(output_dir=str(tmp_path), beta=0.25, orpo_alpha=0.5)


@pytest.mark.parametrize("kwargs,message", BAD_OPTION_VALUES)
def test_bad_values_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(OrpoError, match=re.escape(message)):
        ORPOConfig(output_dir=str(tmp_path), **kwargs)


def test_trainer_converts_plain_training_arguments(tmp_path, model, tokenizer, toy_dataset):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=toy_dataset, processing_class=tokenizer)
    assert isinstance(trainer.args, ORPOConfig) and trainer.args.per_device_train_batch_size == 2


def test_tokenizer_and_processing_class_must_agree(tmp_path, model, tokenizer, toy_dataset):
    other = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    with pytest.raises(OrpoError, match="not two different ones"):
        ORPOTrainer(
            model=model,
            args=ORPOConfig(output_dir=str(tmp_path)),
            train_dataset=toy_dataset,
            tokenizer=tokenizer,
            processing_class=other,
        )


def test_an_unset_prompt_limit_follows_max_length(tmp_path):
    """TRL has no max_prompt_length, and max_length 512 is common: unset, it is half of max_length; only an
    explicit pair that leaves no response token is an error."""
    assert ORPOConfig(output_dir=str(tmp_path), max_length=512).max_prompt_length == 256
    assert ORPOConfig(output_dir=str(tmp_path)).max_prompt_length == 512
    assert ORPOConfig(output_dir=str(tmp_path), max_length=None).max_prompt_length is None
    assert (
        ORPOConfig(output_dir=str(tmp_path), max_length=512, max_prompt_length=400).max_prompt_length == 400
    )
    with pytest.raises(OrpoError, match="must be smaller"):
        ORPOConfig(output_dir=str(tmp_path), max_length=512, max_prompt_length=512)


def test_numbers_of_the_wrong_type_are_errors_from_python_too(tmp_path):
    """As `orpo train` says of a config file: from Python, learning_rate="fast" was accepted silently."""
    with pytest.raises(OrpoError, match=r"learning_rate must be float, got str 'fast'"):
        ORPOConfig(output_dir=str(tmp_path), learning_rate="fast")
    with pytest.raises(OrpoError, match=r"per_device_train_batch_size must be int, got float 1.5"):
        ORPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=1.5)
    assert ORPOConfig(output_dir=str(tmp_path), learning_rate=1).learning_rate == 1  # an int is a float


def test_every_problem_is_reported_at_once(tmp_path):
    """One checker of every value: all problems in one error (one edit fixes them), a mistyped field's own rules
    not evaluated on the wrong type."""
    from orpo.errors import ConfigError

    with pytest.raises(ConfigError) as raised:
        ORPOConfig(
            output_dir=str(tmp_path), orpo_alpha=-1.0, learning_rate="fast", max_length="long", nan_policy="x"
        )
    assert raised.value.problems == [
        "learning_rate must be float, got str 'fast'",
        "max_length must be int | None, got str 'long'",
        "orpo_alpha must be >= 0, got -1.0",
        "nan_policy must be 'error' or 'skip', got 'x'",
    ]
    assert str(raised.value).startswith("4 problems with the settings:\n  - learning_rate must be float")
    with pytest.raises(ConfigError, match="max_length must be int | None, got str '512'"):  # not a TypeError
        ORPOConfig(output_dir=str(tmp_path), max_length="512", max_prompt_length=128)


def test_dataset_columns_must_map_roles_to_column_names(tmp_path):
    """dataset_columns as a bare string (or with other keys) failed at load time with AttributeError; a JSON
    string, as TrainingArguments takes dict fields from the command line, is still fine."""
    for bad in ("question", {"question": "prompt"}, {"prompt": 5}):
        with pytest.raises(OrpoError, match="dataset_columns must map prompt, chosen, rejected, system"):
            ORPOConfig(output_dir=str(tmp_path), dataset_columns=bad)
    good = ORPOConfig(output_dir=str(tmp_path), dataset_columns='{"prompt": "question"}')
    assert good.dataset_columns == {"prompt": "question"}


def test_negative_step_counts_are_errors(tmp_path):
    """max_steps -5 used to train by epochs silently; -1 (the default) still means 'by epochs'."""
    with pytest.raises(
        OrpoError, match="max_steps must be a number of steps, or -1 to train by epochs; got -5"
    ):
        ORPOConfig(output_dir=str(tmp_path), max_steps=-5)
    assert ORPOConfig(output_dir=str(tmp_path)).max_steps == -1
