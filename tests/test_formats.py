"""Table-driven: one small file per format and per bad case (tests/data/)."""

import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

import orpo.data.sources
from orpo.data.formats import normalize_source
from orpo.data.sources import load_source
from orpo.data.tokenize import PairTokenizer
from orpo.errors import OrpoError

DATA = Path(__file__).parent / "data"
HH_PROMPT = "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: 2+2?\n\nAssistant:"
# prompt, chosen, rejected of a two-turn conversation given as whole chosen / rejected conversations
IMPLICIT_MESSAGES = (
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
    ],
    [{"role": "assistant", "content": "4"}],
    [{"role": "assistant", "content": "5"}],
)


def normalized(name, **kwargs):
    return normalize_source(load_source(DATA / name), **kwargs)


@pytest.mark.parametrize(
    "name,kwargs,fmt,prompt,chosen,rejected",
    [
        ("standard.jsonl", {}, "standard", "2+2=", "4", "5"),
        ("list_of_rows.json", {}, "standard", "2+2=", "4", "5"),
        (
            "conversational.jsonl",
            {},
            "conversational",
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
            [{"role": "assistant", "content": "4"}],
            [{"role": "assistant", "content": "5"}],
        ),
        (
            "sharegpt.jsonl",  # ShareGPT's {"from", "value"} messages (Axolotl datasets)
            {},
            "conversational",
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
            [{"role": "assistant", "content": "4"}],
            [{"role": "assistant", "content": "5"}],
        ),
        (
            "sharegpt_implicit.jsonl",
            {},
            "implicit",
            *IMPLICIT_MESSAGES,
        ),
        ("implicit_text.jsonl", {}, "implicit", HH_PROMPT, " 4", " 5"),
        (
            "implicit_messages.jsonl",
            {},
            "implicit",
            *IMPLICIT_MESSAGES,
        ),
        (
            "ultrafeedback.jsonl",
            {},
            "conversational",
            [{"role": "user", "content": "2+2?"}],
            [{"role": "assistant", "content": "4"}],
            [{"role": "assistant", "content": "5"}],
        ),
        (
            "orca.json",
            {},
            "conversational",
            [{"role": "system", "content": "You are a calculator."}, {"role": "user", "content": "2+2?"}],
            [{"role": "assistant", "content": "4"}],
            [{"role": "assistant", "content": "5"}],
        ),
        (
            "stack_exchange.csv",
            {"columns": {"prompt": "question", "chosen": "response_j", "rejected": "response_k"}},
            "standard",
            "How do I add, in Python?",
            "Use +.",
            "Use -.",
        ),
    ],
)
def test_good_formats_are_detected_and_normalised(name, kwargs, fmt, prompt, chosen, rejected):
    dataset, detected, skipped = normalized(name, **kwargs)
    assert detected == fmt and skipped == []
    assert dataset[0] == {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@pytest.mark.parametrize(
    "name,message",
    [
        ("bad_json.jsonl", r"bad_json.jsonl:2: bad JSON at column \d+"),
        ("non_utf8.jsonl", r"non_utf8.jsonl:2: not UTF-8 \(byte offset 63 in the file\)"),
        ("missing_field.jsonl", r"missing_field.jsonl:2: missing field 'rejected'"),
        ("empty_response.jsonl", r"empty_response.jsonl:2: field 'chosen' is empty"),
        ("null_response.jsonl", r"null_response.jsonl:1: missing field 'chosen' \(absent or null\)"),
        ("non_string.jsonl", r"non_string.jsonl:2: field 'rejected' must be a string, got int"),
        (
            "message_without_role.jsonl",
            r"message_without_role.jsonl:1: field 'prompt' message 1 needs 'role'",
        ),
        ("unknown_role.jsonl", r"unknown_role.jsonl:1: field 'prompt' message 1 has unknown role 'human'"),
        (
            "unknown_sender.jsonl",
            r"unknown_sender.jsonl:2: field 'prompt' message 1 has unknown sender 'from: narrator' \(use system, human",
        ),
        ("multiline_bad.csv", r"multiline_bad.csv:4: field 'chosen' is empty"),
        (
            "roles_out_of_order.jsonl",
            r"roles_out_of_order.jsonl:1: field 'chosen' must start with an assistant message, got 'user'",
        ),
    ],
)
def test_bad_rows_name_file_line_and_field(name, message):
    with pytest.raises(OrpoError, match=message):
        normalized(name)


def test_up_to_ten_problems_are_listed_at_once():
    with pytest.raises(OrpoError) as err:
        normalized("many_bad.jsonl")
    text = str(err.value)
    assert text.startswith("12 invalid row(s)")
    assert "many_bad.jsonl:10: field 'chosen' is empty" in text and "many_bad.jsonl:11" not in text
    assert "... and 2 more" in text and "skip_invalid_rows" in text


def test_skip_invalid_drops_rows_and_says_how_many(caplog):
    with caplog.at_level(logging.WARNING, logger="orpo"):
        dataset, _, skipped = normalized("empty_response.jsonl", skip_invalid=True)
    assert len(dataset) == 1 and len(skipped) == 1
    assert "skipped 1 invalid row(s)" in caplog.text and "empty_response.jsonl:2" in caplog.text


def test_identical_pair_is_kept_and_warned_about_once(caplog, tokenizer, tmp_path, monkeypatch):
    """Counted once, by tokens (orpo.data.tokenize), on the one path data takes (orpo.data.load_pairs)."""
    from orpo.data import TruncationLimits, load_pairs

    monkeypatch.setenv("ORPO_CACHE_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="orpo"):
        tokenized, report = load_pairs(str(DATA / "identical.jsonl"), tokenizer, TruncationLimits())
    assert len(tokenized) == 2 and report.identical_pairs == 1
    assert caplog.text.count("identical chosen and rejected") == 1


def test_parquet_save_to_disk_and_directory_sources(tmp_path):
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r"}] * 3
    Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    loaded = load_source(tmp_path / "rows.parquet")
    assert len(loaded.rows) == 3 and loaded.origins[2].endswith("rows.parquet: row 3")
    DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_source(tmp_path / "saved").rows) == 3
    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("standard.jsonl", "orca.json"):
        (folder / name).write_bytes((DATA / name).read_bytes())
    (folder / "standard_copy.jsonl").write_bytes((DATA / "standard.jsonl").read_bytes())
    loaded = load_source(folder)
    assert len(loaded.rows) == 5  # 1 + 2 + 2 rows, files in name order
    assert loaded.origins[0].endswith("orca.json: row 1") and loaded.origins[-1].endswith(
        "standard_copy.jsonl:2"
    )


def test_in_memory_and_hub_sources(monkeypatch):
    rows = Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}])
    assert load_source(rows).origins == ["dataset row 1"]
    assert len(load_source(DatasetDict({"test": rows}), split="test").rows) == 1
    calls = []

    def fake_load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return rows

    monkeypatch.setattr(orpo.data.sources, "load_dataset", fake_load_dataset)
    loaded = load_source("org/prefs", split="train_prefs", subset="en")
    assert calls == [("org/prefs", "en", "train_prefs")]
    assert loaded.origins == ["org/prefs[train_prefs] row 1"]


def test_missing_path_is_a_clear_error():
    with pytest.raises(OrpoError, match="nope.jsonl: no such file"):
        load_source("nope.jsonl")


@pytest.mark.parametrize("name", ["conversational.jsonl", "implicit_messages.jsonl", "orca.json"])
def test_rendered_conversations_have_one_generation_prompt_and_one_eos(tokenizer, name):
    dataset, _, _ = normalized(name)
    ids = PairTokenizer(tokenizer)(dataset[0], 0)
    prompt = tokenizer.decode(ids["prompt_input_ids"])
    assert prompt.endswith("<|im_start|>assistant\n") and prompt.count(
        "<|im_start|>assistant\n"
    ) == prompt.count("<|im_start|>assistant")
    assert prompt.count("<|im_start|>assistant\n") == 1 + sum(
        m["role"] == "assistant" for m in dataset[0]["prompt"]
    )
    for key in ("chosen_input_ids", "rejected_input_ids"):
        assert ids[key].count(tokenizer.eos_token_id) == 1


def test_trainer_takes_a_path_and_a_column_mapping(tmp_path, tokenizer):
    from conftest import make_model
    from orpo import ORPOConfig, ORPOTrainer

    args = ORPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=2,
        report_to="none",
        dataset_columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"},
    )
    trainer = ORPOTrainer(
        model=make_model(),
        args=args,
        train_dataset=str(DATA / "stack_exchange.csv"),
        eval_dataset=str(DATA / "implicit_text.jsonl"),
        tokenizer=tokenizer,
    )
    assert len(trainer.train_dataset) == 2
    trainer.train()


def test_trainer_reports_bad_files_with_their_lines(tmp_path, tokenizer):
    from conftest import make_model
    from orpo import ORPOConfig, ORPOTrainer

    with pytest.raises(OrpoError, match="empty_response.jsonl:2: field 'chosen' is empty"):
        ORPOTrainer(
            model=make_model(),
            args=ORPOConfig(output_dir=str(tmp_path), report_to="none"),
            train_dataset=str(DATA / "empty_response.jsonl"),
            tokenizer=tokenizer,
        )


def test_mixing_sources_with_weights_gives_the_expected_counts(tmp_path):
    from orpo.data import read_pairs

    rows = [{"prompt": f"p{i}", "chosen": "c", "rejected": "r"} for i in range(10)]
    Dataset.from_list(rows).to_json(str(tmp_path / "ten.jsonl"))
    pairs = read_pairs(
        [
            {"path": str(tmp_path / "ten.jsonl"), "weight": 0.5},
            (str(DATA / "standard.jsonl"), 3),
            str(DATA / "stack_exchange.csv"),
        ],
        columns={"prompt": "question", "chosen": "response_j", "rejected": "response_k"},
    )
    mixed, name = pairs.dataset, pairs.name
    assert len(mixed) == 5 + 3 * 2 + 2 and pairs.format == "standard"
    assert len(set(mixed["prompt"][:5])) == 5  # a subset, not a repeat
    assert "x0.5" in name and "x3" in name
    again = read_pairs([{"path": str(tmp_path / "ten.jsonl"), "weight": 0.5}]).dataset
    assert again["prompt"] == mixed["prompt"][:5]  # seeded


def test_mixing_text_and_conversational_sources_is_an_error():
    from orpo.data import read_pairs

    with pytest.raises(OrpoError, match="mix plain-text and conversational rows"):
        read_pairs([str(DATA / "standard.jsonl"), str(DATA / "conversational.jsonl")])


def test_implicit_text_without_an_assistant_marker_splits_as_trl_does(tmp_path):
    """TRL's extract_prompt: the longest common prefix, the space before the first difference going to the
    responses; a row whose shared text has an assistant marker still splits there (the whole assistant turn
    is the response, as in Anthropic HH). check-data says which rule split how many rows."""
    from orpo.data import read_pairs
    from orpo.data.check import check_data

    rows = [
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"chosen": "Beautiful is better than ugly.", "rejected": "Beautiful is better than nothing."},
        {
            "chosen": "\n\nHuman: sky?\n\nAssistant: It is blue.",
            "rejected": "\n\nHuman: sky?\n\nAssistant: It is red.",
        },
    ]
    path = tmp_path / "implicit.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    pairs = read_pairs(str(path))
    assert pairs.format == "implicit"
    assert pairs.dataset[0] == {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert pairs.dataset[1]["prompt"] == "Beautiful is better than"
    assert pairs.dataset[2]["prompt"] == "\n\nHuman: sky?\n\nAssistant:"
    assert pairs.dataset[2]["chosen"] == " It is blue."
    report = check_data(str(path))
    assert "2 rows split at the longest common prefix (TRL's extract_prompt)" in report
    assert "1 rows split at the last assistant marker" in report


def test_wrong_column_names_are_named_as_the_file_has_them(tmp_path):
    """A file with question/good/bad: the message lists the file's own columns (not 'prompt', the name
    'question' is read as) and how to map them from the command line, a config file and Python."""
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"question": "q", "good": "a", "bad": "b"}) + "\n")
    with pytest.raises(OrpoError) as err:
        normalize_source(load_source(path))
    message = str(err.value)
    assert "['question', 'good', 'bad']" in message and "'prompt'" not in message.split("columns are")[1]
    assert (
        "--columns prompt=COL" in message
        and "dataset_columns:" in message
        and "ORPOConfig(dataset_columns" in message
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_a_byte_order_mark_is_not_part_of_the_data(tmp_path, suffix):
    """Windows editors and Excel start files with a UTF-8 byte-order mark; it was read into the first row
    or the first CSV header ('\\ufeffprompt'), so every row failed."""
    row = {"prompt": "p", "chosen": "c", "rejected": "r"}
    text = {
        ".jsonl": json.dumps(row) + "\n",
        ".json": json.dumps([row]),
        ".csv": "prompt,chosen,rejected\np,c,r\n",
    }[suffix]
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    dataset, fmt, _ = normalize_source(load_source(path))
    assert fmt == "standard" and dataset[0] == row
