import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model, toy_rows
from orpo import ORPOConfig, ORPOTrainer
from orpo.cli import main
from orpo.run_folder import trained_with_chat_template

peft = pytest.importorskip("peft")


def _args(tmp_path, **kwargs):
    """3 steps of 4 pairs at a learning rate that moves a tiny adapter visibly."""
    base = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        bf16=False,  # merge exactness at fp32 (bf16 is the default on a CPU with native bf16)
    )
    return ORPOConfig(**{**base, **kwargs})


def test_lora_trains_only_the_adapter_and_merge_equals_base_plus_adapter(tmp_path, tokenizer):
    from datasets import Dataset

    base_dir = tmp_path / "base"
    base = make_model(seed=2)
    base.save_pretrained(str(base_dir))
    tokenizer.save_pretrained(str(base_dir))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    args = _args(tmp_path)
    trainer = ORPOTrainer(
        model=str(base_dir),
        args=args,
        train_dataset=Dataset.from_list(toy_rows(16)),
        tokenizer=tokenizer,
        peft_config=lora,
    )
    trainer.train()
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # the adapter did train (lora_B starts at zero), so the merge check below compares something
    assert any(p.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n)
    for name, param in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name and "base_layer" not in name:
            assert torch.equal(param, before[name]), name
    adapter_dir = tmp_path / "adapter"
    trainer.save_model(str(adapter_dir))
    assert (adapter_dir / "adapter_model.safetensors").is_file()

    assert main(["merge", "--adapter", str(adapter_dir), "--output", str(tmp_path / "merged")]) == 0
    # the merged model keeps the record of how its prompts were rendered (generate reads it)
    assert trained_with_chat_template(tmp_path / "merged") is False
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_the_adapter_starts_from_the_seed_whatever_ran_before(tmp_path, tokenizer):
    """LoRA's initial weights come from ``seed``, not from the random state the model's loading left."""
    from datasets import Dataset

    def initial_adapter(seed, draws_before):
        torch.manual_seed(1234)
        torch.rand(draws_before)  # e.g. a partitioned (ZeRO-3) load draws numbers of its own
        lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        trainer = ORPOTrainer(
            model=make_model(seed=3),
            args=_args(tmp_path, seed=seed),
            train_dataset=Dataset.from_list(toy_rows(4)),
            tokenizer=tokenizer,
            peft_config=lora,
        )
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_A" in n}

    first = initial_adapter(seed=0, draws_before=1)
    assert first
    same = initial_adapter(seed=0, draws_before=1000)
    other = initial_adapter(seed=1, draws_before=1)
    assert all(torch.equal(first[n], same[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


def test_merge_without_adapter_is_a_clear_error(tmp_path, capsys):
    assert main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert "no adapter_config.json" in capsys.readouterr().err


def test_an_adapter_without_a_recorded_base_is_a_clear_error(tmp_path, tokenizer, capsys):
    """An adapter trained on a model built in memory names no base; loading it used to send transformers
    to the hub for a model called 'None' (30 s of retries offline), then fail with a network error."""
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adapter = tmp_path / "adapter"
    peft.get_peft_model(make_model(), lora).save_pretrained(str(adapter))
    tokenizer.save_pretrained(str(adapter))
    assert main(["eval", "--model", str(adapter), "--data", "demo:test"]) == 1
    assert "LoRA adapter whose base model is not recorded" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]) == 1
    assert "LoRA adapter whose base model is not recorded" in capsys.readouterr().err


# ---- QLoRA: a 4-bit base (bitsandbytes' 4-bit layers run on CPU too) -------------------------------


def _saved_base(tmp_path, tokenizer):
    from orpo.demo import tiny_model

    base_dir = tmp_path / "base"
    # the demo model (hidden 64): bitsandbytes' CPU inference path needs layers at least a 64-block wide
    tiny_model(seed=2).save_pretrained(str(base_dir))
    tokenizer.save_pretrained(str(base_dir))
    return base_dir


def _qlora_args(tmp_path, **kwargs):
    return _args(tmp_path, model_init_kwargs={"load_in_4bit": True}, **kwargs)


def test_qlora_trains_a_4bit_base_through_the_adapter(tmp_path, tokenizer):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from datasets import Dataset

    base_dir = _saved_base(tmp_path, tokenizer)
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = ORPOTrainer(
        model=str(base_dir),
        args=_qlora_args(tmp_path, activation_checkpointing=True),
        train_dataset=Dataset.from_list(toy_rows(16)),
        tokenizer=tokenizer,
        peft_config=lora,
    )
    base = trainer.model.get_base_model()
    assert isinstance(base.model.layers[0].mlp.gate_proj, bnb.nn.Linear4bit)  # the base really is 4-bit
    quantized = {n: p.detach().clone() for n, p in base.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.head.plan is not None  # the head (not quantized) still runs chunked
    for name, param in base.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, quantized[name]), name  # frozen
    assert any(
        not torch.equal(p, lora_before[n]) for n, p in trainer.model.named_parameters() if "lora_B" in n
    )
    adapter_dir = tmp_path / "adapter"
    trainer.save_model(str(adapter_dir))
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    assert not (adapter_dir / "model.safetensors").exists()  # only the adapter is saved


def test_a_4bit_model_without_an_adapter_is_a_clear_error(tmp_path, tokenizer):
    pytest.importorskip("bitsandbytes")
    from datasets import Dataset

    from orpo.errors import OrpoError

    with pytest.raises(OrpoError, match="loaded in 4-bit or 8-bit.*train an adapter"):
        ORPOTrainer(
            model=str(_saved_base(tmp_path, tokenizer)),
            args=_qlora_args(tmp_path),
            train_dataset=Dataset.from_list(toy_rows(4)),
            tokenizer=tokenizer,
        )


def test_load_in_4bit_without_bitsandbytes_says_what_to_install(tmp_path, tokenizer, monkeypatch):
    import importlib.util

    from orpo.errors import OrpoError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a)
    )
    with pytest.raises(OrpoError, match=r"load_in_4bit needs bitsandbytes.*pip install 'orpo\[qlora\]'"):
        ORPOTrainer(
            model=str(_saved_base(tmp_path, tokenizer)), args=_qlora_args(tmp_path), tokenizer=tokenizer
        )


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_peft_model_passed_in_trains_its_adapter_with_the_chunked_head(tmp_path, tokenizer, checkpointing):
    """A ``PeftModel`` built by the user (no ``peft_config``) trains as one built by the trainer, with
    and without activation checkpointing: the same losses, and only the adapter moves."""
    from datasets import Dataset

    def run(lora_model, **kwargs):
        trainer = ORPOTrainer(
            model=lora_model,
            args=_args(tmp_path, **kwargs),
            train_dataset=Dataset.from_list(toy_rows(16)),
            tokenizer=tokenizer,
        )
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return trainer, losses

    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)
    reference = peft.get_peft_model(make_model(seed=2), lora)
    before = {n: p.detach().clone() for n, p in reference.named_parameters()}
    _, expected = run(reference)  # trained in place

    torch.manual_seed(0)
    model = peft.get_peft_model(make_model(seed=2), lora)
    trainer, losses = run(model, activation_checkpointing=checkpointing)
    assert trainer.head.plan is not None  # the chunked head, not full logits
    assert len(losses) == 3 and losses == pytest.approx(expected, rel=1e-5)
    for name, param in model.named_parameters():
        if "lora_" in name:
            assert torch.allclose(param, dict(reference.named_parameters())[name], atol=1e-6), name
            if "lora_B" in name:  # starts at zero: a change means the adapter trained
                assert not torch.equal(param, before[name]), name
        else:
            assert torch.equal(param, before[name]), name


def test_the_adapter_is_seeded_without_touching_the_global_generator(tmp_path):
    """The adapter's initial weights come from args.seed, whatever state the caller's generator is in, and the
    caller's generator is left where it was (no global set_seed inside a loader)."""
    from peft import LoraConfig

    from orpo.models import wrap_peft

    args = ORPOConfig(output_dir=str(tmp_path), seed=3, report_to="none")
    adapters = []
    for caller_seed in (0, 1):
        model = make_model()
        torch.manual_seed(caller_seed)
        before = torch.random.get_rng_state()
        wrapped = wrap_peft(model, LoraConfig(r=4, task_type="CAUSAL_LM"), args)
        assert torch.equal(torch.random.get_rng_state(), before)
        adapters.append({n: p.detach().clone() for n, p in wrapped.named_parameters() if "lora_A" in n})
    assert adapters[0] and all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])


def test_merge_is_staged_keeps_the_runs_settings_and_refuses_the_base_folder(
    tmp_path, tokenizer, monkeypatch
):
    """Issue 31 items 8 and 9: a killed merge leaves no folder that loads as the merged model; the merged
    model carries the adapter run's settings (orpo eval scores both alike); the adapter's base folder is
    never the target (the adapter loads onto it)."""
    import yaml
    from datasets import Dataset
    from transformers import PreTrainedModel

    base_dir = _saved_base(tmp_path, tokenizer)
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    args = _args(tmp_path, max_steps=1, orpo_alpha=1.0, max_length=64)
    trainer = ORPOTrainer(
        model=str(base_dir),
        args=args,
        train_dataset=Dataset.from_list(toy_rows(8)),
        tokenizer=tokenizer,
        peft_config=lora,
    )
    trainer.train()
    run = tmp_path / "run"
    trainer.save_model(str(run))
    merged = tmp_path / "merged"
    assert main(["merge", "--adapter", str(run), "--output", str(merged)]) == 0
    settings = yaml.safe_load((merged / "orpo_config.yaml").read_text())
    assert settings == yaml.safe_load((run / "orpo_config.yaml").read_text())
    assert settings["orpo_alpha"] == 1.0 and settings["max_length"] == 64

    base_weights = (base_dir / "model.safetensors").read_bytes()
    assert main(["merge", "--adapter", str(run), "--output", str(base_dir), "--overwrite"]) == 2
    assert (base_dir / "model.safetensors").read_bytes() == base_weights

    original = PreTrainedModel.save_pretrained

    def killed_after_writing(self, *a, **k):
        original(self, *a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", killed_after_writing)
    assert main(["merge", "--adapter", str(run), "--output", str(tmp_path / "killed")]) != 0
    assert sorted(p.name for p in tmp_path.iterdir() if "killed" in p.name) == []
