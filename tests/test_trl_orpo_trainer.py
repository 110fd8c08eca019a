"""TRL's own ORPO trainer tests, run against orpo with only the import changed.

Source: huggingface/trl, ``tests/experimental/test_orpo_trainer.py`` (Apache-2.0), as of TRL 1.16. Each test
below makes the same calls with the same arguments and asserts the same things as its TRL counterpart, named
alike. What changed, and only where the hub or the machine needs it:

- hub models become local stand-ins of the same kinds, built once per module: ``tiny-Qwen2ForCausalLM-2.5`` a
  tiny Qwen2 model saved with a ChatML tokenizer (the demo tokenizer), ``tiny-RemoteForCausalLM`` a folder
  whose config maps to model code in the folder (loaded only with ``trust_remote_code``),
  ``tiny-T5ForConditionalGeneration`` a tiny T5;
- the ``trl-internal-testing/zen`` dataset becomes :func:`zen`, rows of the same four formats (standard,
  standard implicit prompt, conversational, conversational implicit prompt) with train and test splits;
- TRL's ``TrlTestCase`` temporary directory is pytest's ``tmp_path``;
- the T5 case is expected to raise orpo's clear error: orpo trains decoder-only models (README, "Coming from
  TRL"); TRL's test asserts it trains;
- ``test_train_model_dtype`` sets ``adam_epsilon=1e-4``: pure-fp16 AdamW with the default epsilon blows the
  stand-in's weights up to NaN, which TRL trains on silently and orpo stops (the test after it shows both).
"""

import json

import pytest
import torch
from datasets import Dataset, DatasetDict
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    Qwen2Config,
    Qwen2ForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from orpo import ORPOConfig, ORPOTrainer  # TRL: from trl.experimental.orpo import ORPOConfig, ORPOTrainer
from orpo.demo import demo_tokenizer
from orpo.errors import OrpoError

pytestmark = pytest.mark.slow

QWEN = "tiny-Qwen2ForCausalLM-2.5"
REMOTE = "tiny-RemoteForCausalLM"
T5 = "tiny-T5ForConditionalGeneration"

# Model code a hub repository would carry; transformers runs it only with trust_remote_code.
REMOTE_CONFIG_CODE = """from transformers import Qwen2Config


class RemoteConfig(Qwen2Config):
    model_type = "remote"
"""
REMOTE_MODEL_CODE = """from transformers import Qwen2ForCausalLM

from .configuration_remote import RemoteConfig


class RemoteForCausalLM(Qwen2ForCausalLM):
    config_class = RemoteConfig
"""


def _qwen2_config(**extra):
    tokenizer = demo_tokenizer()
    return Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=8,  # the sizes of trl-internal-testing/tiny-Qwen2ForCausalLM-2.5, but its vocabulary
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **extra,
    )


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """Local folders standing in for the hub repositories TRL's tests load, by repository name."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    qwen = root / QWEN
    Qwen2ForCausalLM(_qwen2_config()).save_pretrained(str(qwen))
    demo_tokenizer().save_pretrained(str(qwen))
    remote = root / REMOTE
    Qwen2ForCausalLM(_qwen2_config()).save_pretrained(str(remote))
    demo_tokenizer().save_pretrained(str(remote))
    config = json.loads((remote / "config.json").read_text())
    config.update(
        model_type="remote",
        architectures=["RemoteForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_remote.RemoteConfig",
            "AutoModelForCausalLM": "modeling_remote.RemoteForCausalLM",
        },
    )
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "configuration_remote.py").write_text(REMOTE_CONFIG_CODE)
    (remote / "modeling_remote.py").write_text(REMOTE_MODEL_CODE)
    t5 = root / T5
    T5ForConditionalGeneration(
        T5Config(vocab_size=len(demo_tokenizer()), d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)
    ).save_pretrained(str(t5))
    demo_tokenizer().save_pretrained(str(t5))
    return {name: str(root / name) for name in (QWEN, REMOTE, T5)}


SKY = [
    ("The sky is", " blue.", " green."),
    ("Beautiful is better than", " ugly.", " the sky."),
    ("Explicit is better than", " implicit.", " not explicit."),
    ("Simple is better than", " complex.", " complicated."),
    ("Flat is better than", " nested.", " stacked."),
    ("Sparse is better than", " dense.", " heavy."),
    ("Readability", " counts.", " is nothing."),
    ("Errors should never", " pass silently.", " be seen."),
    ("In the face of ambiguity,", " refuse the temptation to guess.", " guess."),
    ("Now is better than", " never.", " later."),
    ("Namespaces are one", " honking great idea.", " bad idea."),
    ("There should be one", " obvious way to do it.", " hundred ways."),
    ("Practicality beats", " purity.", " nothing."),
    ("Special cases aren't special enough", " to break the rules.", " to matter."),
    ("If the implementation is hard to explain,", " it's a bad idea.", " it's great."),
    ("Although never is often better than", " right now.", " soon."),
    ("Complex is better than", " complicated.", " simple."),
    ("Unless explicitly", " silenced.", " shouted."),
    ("If the implementation is easy to explain,", " it may be a good idea.", " it is bad."),
    ("The grass is", " green.", " blue."),
]


def _row(config_name: str, prompt: str, chosen: str, rejected: str) -> dict:
    if config_name == "standard_preference":
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if config_name == "standard_implicit_prompt_preference":
        return {"chosen": prompt + chosen, "rejected": prompt + rejected}
    user = [{"role": "user", "content": prompt}]
    answer = {"chosen": chosen.strip(), "rejected": rejected.strip()}
    if config_name == "conversational_preference":
        return {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": answer["chosen"]}],
            "rejected": [{"role": "assistant", "content": answer["rejected"]}],
        }
    assert config_name == "conversational_implicit_prompt_preference"
    return {side: user + [{"role": "assistant", "content": answer[side]}] for side in ("chosen", "rejected")}


def zen(config_name: str, split: str | None = None):
    """Stands in for ``load_dataset("trl-internal-testing/zen", config_name, split=split)``."""
    rows = [_row(config_name, *triple) for triple in SKY]
    dataset = DatasetDict({"train": Dataset.from_list(rows[:17]), "test": Dataset.from_list(rows[17:])})
    return dataset if split is None else dataset[split]


@pytest.fixture
def setup(hub):
    """TRL's ``setup_method``."""
    model = AutoModelForCausalLM.from_pretrained(hub[QWEN], dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(hub[QWEN])
    tokenizer.pad_token = tokenizer.eos_token
    t5_model = AutoModelForSeq2SeqLM.from_pretrained(hub[T5], dtype="float32")
    t5_tokenizer = AutoTokenizer.from_pretrained(hub[T5])
    return model, tokenizer, t5_model, t5_tokenizer


def test_trust_remote_code(tmp_path, hub):
    dataset = zen("standard_preference", split="train")
    tokenizer = AutoTokenizer.from_pretrained(hub[REMOTE], trust_remote_code=True)
    with pytest.raises(ValueError, match="custom code"):
        ORPOTrainer(
            model=hub[REMOTE],
            args=ORPOConfig(output_dir=str(tmp_path), report_to="none"),
            processing_class=tokenizer,
            train_dataset=dataset,
        )
    trainer = ORPOTrainer(
        model=hub[REMOTE],
        args=ORPOConfig(output_dir=str(tmp_path), report_to="none", trust_remote_code=True),
        processing_class=tokenizer,
        train_dataset=dataset,
    )
    assert type(trainer.model).__name__ == "RemoteForCausalLM"


@pytest.mark.parametrize(
    "name, config_name",
    [
        ("qwen", "standard_preference"),
        ("t5", "standard_implicit_prompt_preference"),
        ("qwen", "conversational_preference"),
    ],
)
def test_orpo_trainer(tmp_path, setup, name, config_name):
    model, tokenizer, t5_model, t5_tokenizer = setup
    training_args = ORPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=3,
        remove_unused_columns=False,
        gradient_accumulation_steps=1,
        learning_rate=9e-1,
        eval_strategy="steps",
        beta=0.1,
        report_to="none",
    )
    dataset = zen(config_name)
    if name == "t5":
        model, tokenizer = t5_model, t5_tokenizer
        training_args.is_encoder_decoder = True
        # orpo trains decoder-only models (the one TRL feature it does not have): a clear error, not a crash
        with pytest.raises(OrpoError, match="encoder-decoder model; orpo trains decoder-only"):
            ORPOTrainer(
                model=model,
                args=training_args,
                processing_class=tokenizer,
                train_dataset=dataset["train"],
                eval_dataset=dataset["test"],
            )
        return
    trainer = ORPOTrainer(
        model=model,
        args=training_args,
        processing_class=tokenizer,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
    )
    previous_trainable_params = {n: param.clone() for n, param in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for n, param in previous_trainable_params.items():
        new_param = trainer.model.get_parameter(n)
        if param.sum() != 0:  # ignore 0 biases
            assert not torch.equal(param, new_param)


def test_orpo_trainer_processing_class_autoloaded(tmp_path, setup):
    model = setup[0]
    training_args = ORPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=3,
        remove_unused_columns=False,
        beta=0.1,
        report_to="none",
    )
    dataset = zen("standard_preference")
    trainer = ORPOTrainer(model=model, args=training_args, train_dataset=dataset["train"])
    assert trainer.processing_class is not None
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None


@pytest.mark.parametrize(
    "config_name",
    [
        "standard_preference",
        "standard_implicit_prompt_preference",
        "conversational_preference",
        "conversational_implicit_prompt_preference",
    ],
)
def test_orpo_trainer_with_lora(tmp_path, setup, config_name):
    from peft import LoraConfig

    model, tokenizer = setup[:2]
    lora_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    training_args = ORPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=3,
        remove_unused_columns=False,
        gradient_accumulation_steps=4,
        learning_rate=9e-1,
        eval_strategy="steps",
        beta=0.1,
        report_to="none",
    )
    dataset = zen(config_name)
    trainer = ORPOTrainer(
        model=model,
        args=training_args,
        processing_class=tokenizer,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        peft_config=lora_config,
    )
    previous_trainable_params = {n: param.clone() for n, param in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for n, param in previous_trainable_params.items():
        if "lora" in n:
            new_param = trainer.model.get_parameter(n)
            if param.sum() != 0:  # ignore 0 biases
                assert not torch.equal(param, new_param)


def test_compute_metrics(tmp_path, hub):
    model = AutoModelForCausalLM.from_pretrained(hub[QWEN], dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(hub[QWEN])
    tokenizer.pad_token = tokenizer.eos_token
    dataset = zen("standard_preference")

    def dummy_compute_metrics(*args, **kwargs):
        return {"test": 0.0}

    training_args = ORPOConfig(
        output_dir=str(tmp_path),
        remove_unused_columns=False,
        per_device_train_batch_size=2,
        do_eval=True,
        eval_strategy="steps",
        eval_steps=1,
        per_device_eval_batch_size=2,
        report_to="none",
    )
    trainer = ORPOTrainer(
        model=model,
        args=training_args,
        processing_class=tokenizer,
        train_dataset=dataset["train"],
        eval_dataset=dataset["test"],
        compute_metrics=dummy_compute_metrics,
    )
    trainer.train()
    assert trainer.state.log_history[-2]["eval_test"] == 0.0


def test_train_model_dtype(tmp_path, hub):
    dataset = zen("standard_preference", split="train")
    training_args = ORPOConfig(
        output_dir=str(tmp_path),
        model_init_kwargs={"dtype": torch.float16},
        learning_rate=0.1,  # use higher lr because gradients are tiny and default lr can stall updates
        report_to="none",
        adam_epsilon=1e-4,  # changed, see test_pure_fp16_adam_blow_up_stops_with_a_clear_error
    )
    trainer = ORPOTrainer(model=hub[QWEN], args=training_args, train_dataset=dataset)
    previous_trainable_params = {n: param.clone() for n, param in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for n, param in previous_trainable_params.items():
        if "layernorm" in n:  # can be unchanged in CI; ignore (matches DPO's test)
            continue
        new_param = trainer.model.get_parameter(n)
        assert new_param.dtype == torch.float16
        assert not torch.equal(param, new_param), f"Parameter {n} has not changed."


def test_pure_fp16_adam_blow_up_stops_with_a_clear_error(tmp_path, hub):
    """Not TRL's: why test_train_model_dtype sets adam_epsilon. With fp16 weights AdamW keeps fp16 states, in
    which the default epsilon (1e-8) is 0 and small squared gradients underflow, so some updates are
    ~1e4 (measured on this stand-in: a weight of 21,888 after 3 steps at lr 0.1) and the loss is NaN from
    step 4 to 7. TRL's trainer trains on with NaN weights (loss logged as 0, grad_norm nan), which its
    assertion "the parameters changed" does not notice; orpo stops at the first non-finite loss, naming the
    step and rows, with the weights from before it saved. With epsilon 1e-4 (fp16's smallest normal is
    6e-5) the same run stays finite."""
    dataset = zen("standard_preference", split="train")
    training_args = ORPOConfig(
        output_dir=str(tmp_path),
        model_init_kwargs={"dtype": torch.float16},
        learning_rate=0.1,
        report_to="none",
        # the response-only NLL these numbers were measured with; with the prompt in the NLL (the default
        # since issue 27) the same run first stops as diverged (1.8e4 at step 4), before any NaN
        nll_include_prompt=False,
    )
    trainer = ORPOTrainer(model=hub[QWEN], args=training_args, train_dataset=dataset)
    with pytest.raises(OrpoError, match=r"non-finite loss \(nan\) at step \d, dataset rows"):
        trainer.train()


def test_train_with_eval(tmp_path, hub):
    dataset = zen("standard_preference")
    training_args = ORPOConfig(
        output_dir=str(tmp_path), eval_strategy="steps", eval_steps=3, report_to="none"
    )
    trainer = ORPOTrainer(
        model=hub[QWEN], args=training_args, train_dataset=dataset["train"], eval_dataset=dataset["test"]
    )
    trainer.train()
    assert trainer.state.log_history[0]["eval_loss"] is not None


def test_train_with_gradient_checkpointing(tmp_path, hub):
    dataset = zen("standard_preference", split="train")
    training_args = ORPOConfig(
        output_dir=str(tmp_path),
        learning_rate=0.1,  # use higher lr because gradients are tiny and default lr can stall updates
        gradient_checkpointing=True,
        report_to="none",
    )
    trainer = ORPOTrainer(model=hub[QWEN], args=training_args, train_dataset=dataset)
    previous_trainable_params = {n: param.clone() for n, param in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for n, param in previous_trainable_params.items():
        new_param = trainer.model.get_parameter(n)
        assert not torch.equal(param, new_param), f"Parameter {n} has not changed."


def test_tag_added(tmp_path, hub):
    dataset = zen("standard_preference", split="train")
    trainer = ORPOTrainer(
        model=hub[QWEN], args=ORPOConfig(output_dir=str(tmp_path), report_to="none"), train_dataset=dataset
    )
    for tag in ["orpo", "trl"]:
        assert tag in trainer.model.model_tags


def test_tag_added_peft(tmp_path, hub):
    from peft import LoraConfig

    dataset = zen("standard_preference", split="train")
    trainer = ORPOTrainer(
        model=hub[QWEN],
        args=ORPOConfig(output_dir=str(tmp_path), report_to="none"),
        train_dataset=dataset,
        peft_config=LoraConfig(),
    )
    for tag in ["orpo", "trl"]:
        assert tag in trainer.model.model_tags
