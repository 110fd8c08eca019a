import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import make_model, toy_rows
from orpo import ORPOConfig, ORPOTrainer
from orpo.cli import main

peft = pytest.importorskip("peft")


def test_lora_trains_only_the_adapter_and_merge_equals_base_plus_adapter(tmp_path, tokenizer):
    from datasets import Dataset

    base_dir = tmp_path / "base"
    base = make_model(seed=2)
    base.save_pretrained(str(base_dir))
    tokenizer.save_pretrained(str(base_dir))
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    args = ORPOConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
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
    for name, param in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name and "base_layer" not in name:
            assert torch.equal(param, before[name]), name
    adapter_dir = tmp_path / "adapter"
    trainer.save_model(str(adapter_dir))
    assert (adapter_dir / "adapter_model.safetensors").is_file()

    assert main(["merge", "--adapter", str(adapter_dir), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_merge_without_adapter_is_a_clear_error(tmp_path, capsys):
    assert main(["merge", "--adapter", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    assert "no adapter_config.json" in capsys.readouterr().err
