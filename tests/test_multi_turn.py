"""Multi-turn preference rows split as TRL splits them (issue 27 item 4): a string ``prompt`` next to whole
conversations (Anthropic HH "trl-style", Capybara) and implicit-prompt conversations get every turn chosen and
rejected share as the prompt, and only what differs as the responses."""

import json
import os
import random

import pytest
from datasets import Dataset

from orpo.data import load_pairs
from orpo.data.check import check_data
from orpo.data.formats import normalize_row
from orpo.data.tokenize import TruncationLimits
from orpo.demo import demo_tokenizer, tiny_model


def conversation(*turns):
    return [{"role": role, "content": content} for role, content in turns]


def hh_trl_style(k: int) -> dict:
    """HH "trl-style": the first user turn as a string, chosen / rejected the whole conversations."""
    first = f"How do I bake bread, {k}?"
    shared = [("user", first), ("assistant", "Flour, water, yeast."), ("user", f"And for how long ({k})?")]
    return {
        "prompt": first,
        "chosen": conversation(*shared, ("assistant", "About 40 minutes at 220 C.")),
        "rejected": conversation(*shared, ("assistant", "Forever.")),
    }


def capybara(k: int, rng: random.Random) -> dict:
    """Capybara-shaped: several shared turns, and responses that may run on for more turns on one side."""
    turns = [("user", f"Question {k}.0")]
    for t in range(rng.randint(1, 3)):
        turns += [("assistant", f"Answer {k}.{t}"), ("user", f"Question {k}.{t + 1}")]
    chosen = [("assistant", f"good {k}")]
    rejected = [("assistant", f"bad {k}")] + ([("user", "why?"), ("assistant", "because")] if k % 3 else [])
    return {
        "prompt": turns[0][1],
        "chosen": conversation(*turns, *chosen),
        "rejected": conversation(*turns, *rejected),
        "source": "toy",
    }


def implicit(k: int) -> dict:
    row = hh_trl_style(k)
    return {"chosen": row["chosen"], "rejected": row["rejected"]}


def test_a_string_prompt_with_whole_conversations_takes_every_shared_turn():
    row = normalize_row(hh_trl_style(0), "conversational")
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"]
    assert row["chosen"] == conversation(("assistant", "About 40 minutes at 220 C."))
    assert row["rejected"] == conversation(("assistant", "Forever."))


def test_conversations_without_the_prompt_get_it_as_the_first_turn_and_a_system_column_first():
    row = normalize_row(
        {
            "prompt": "Name a colour.",
            "system": "Be brief.",
            "chosen": conversation(("assistant", "Blue."), ("user", "Another?"), ("assistant", "Red.")),
            "rejected": conversation(("assistant", "Blue."), ("user", "Another?"), ("assistant", "Dog.")),
        },
        "conversational",
    )
    assert row["prompt"] == conversation(
        ("system", "Be brief."),
        ("user", "Name a colour."),
        ("assistant", "Blue."),
        ("user", "Another?"),
    )
    assert row["chosen"] == conversation(("assistant", "Red."))


@pytest.fixture(scope="module")
def trl_and_ours(tmp_path_factory):
    """40 multi-turn rows (HH trl-style, Capybara-shaped, implicit) tokenized by TRL 1.16's ORPOTrainer and
    by orpo, with the demo tokenizer's ChatML template."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    trl_orpo = pytest.importorskip("trl.experimental.orpo")
    rng = random.Random(0)
    sets = {
        "hh-trl-style": [hh_trl_style(k) for k in range(14)],
        "capybara": [capybara(k, rng) for k in range(14)],
        "implicit": [implicit(k) for k in range(12)],
    }
    tokenizer = demo_tokenizer()
    out = {}
    for name, rows in sets.items():
        trainer = trl_orpo.ORPOTrainer(
            model=tiny_model(),
            args=trl_orpo.ORPOConfig(
                output_dir=str(tmp_path_factory.mktemp(name)), report_to="none", bf16=False, max_length=1024
            ),
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        ours, _ = load_pairs(Dataset.from_list(rows), tokenizer, TruncationLimits(1024, 512))
        out[name] = (trainer.train_dataset, ours)
    return tokenizer, out


@pytest.mark.parametrize("shape", ["hh-trl-style", "capybara", "implicit"])
def test_prompt_and_response_boundaries_equal_trls(trl_and_ours, shape):
    """Token for token: TRL's prompt ids are orpo's; TRL's chosen / rejected ids (prompt included) are the
    prompt's followed by orpo's response ids and one more EOS (TRL appends one after the template's own
    <|im_end|>: the README lists that difference)."""
    tokenizer, out = trl_and_ours
    theirs, ours = out[shape]
    assert len(theirs) == len(ours)
    for trl_row, row in zip(theirs, ours, strict=True):
        assert trl_row["prompt_input_ids"] == row["prompt_input_ids"]
        for side in ("chosen", "rejected"):
            prompt_length = len(trl_row["prompt_input_ids"])
            assert trl_row[f"{side}_input_ids"][:prompt_length] == row["prompt_input_ids"]
            assert trl_row[f"{side}_input_ids"][prompt_length:] == [
                *row[f"{side}_input_ids"],
                tokenizer.eos_token_id,
            ]


def test_check_data_shows_the_split_of_a_multi_turn_row(tmp_path):
    path = tmp_path / "multi.jsonl"
    single = {
        "prompt": "Q",
        "chosen": conversation(("user", "Q"), ("assistant", "yes")),
        "rejected": conversation(("user", "Q"), ("assistant", "no")),
    }
    rows = [single, hh_trl_style(1)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    report = check_data(str(path), demo_tokenizer())
    assert "multi-turn: 1 rows" in report
    assert "row 2: prompt [user, assistant, user] | chosen [assistant] | rejected [assistant]" in report
    assert "first multi-turn row (row 2) as the model sees it" in report
    assert repr("And for how long (1)?<|im_end|>\n<|im_start|>assistant\n⟦|⟧About 40")[1:-1] in report


U = {"role": "user", "content": "Q"}


def a(text):
    return {"role": "assistant", "content": text}


@pytest.mark.parametrize(
    ("chosen", "rejected", "prompt_text", "responses"),
    [
        # the prompt string differs from the conversation's user turn by a space: the shared turns are the prompt
        ([U, a("A")], [U, a("B")], "Q ", ([a("A")], [a("B")])),
        # differing first at a user turn: the responses start at the last shared assistant turn
        (
            [U, a("A1"), {"role": "user", "content": "Y"}, a("A")],
            [U, a("A1"), {"role": "user", "content": "Z"}, a("B")],
            "Q",
            (
                [a("A1"), {"role": "user", "content": "Y"}, a("A")],
                [a("A1"), {"role": "user", "content": "Z"}, a("B")],
            ),
        ),
        # one side a prefix of the other
        ([U, a("A"), {"role": "user", "content": "more"}, a("C")], [U, a("A")], "Q", None),
        # one side holds the user turn, the other only the answer (per side, as before)
        ([U, a("A")], [a("B")], "Q", ([a("A")], [a("B")])),
    ],
    ids=["prompt-spacing", "differ-at-user", "prefix", "mixed"],
)
def test_uneven_conversations_keep_an_assistant_turn_on_each_side(chosen, rejected, prompt_text, responses):
    row = normalize_row({"prompt": prompt_text, "chosen": chosen, "rejected": rejected}, "conversational")
    assert row["prompt"] == [U]  # the conversation's own user turn, not a second one from the string
    assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
    if responses is not None:
        assert (row["chosen"], row["rejected"]) == responses
