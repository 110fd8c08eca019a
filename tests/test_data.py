import logging

import pytest
from datasets import Dataset
from tokenizers import processors

from orpo.data.tokenize import PairTokenizer, TruncationLimits, tokenize_dataset, truncate_pair
from orpo.demo import demo_tokenizer
from orpo.errors import OrpoError


def bos_tokenizer():
    """The demo tokenizer, made to add <|endoftext|> as BOS like Llama's tokenizers do."""
    tok = demo_tokenizer()
    tok.bos_token = "<|endoftext|>"
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", pair="<|endoftext|> $A $B", special_tokens=[("<|endoftext|>", bos)]
    )
    assert tok("a").input_ids[0] == bos
    return tok


def test_standard_row_appends_eos_once(tokenizer):
    enc = PairTokenizer(tokenizer)
    out = enc({"prompt": "1+1=", "chosen": "2", "rejected": "3<|im_end|>"}, 0)
    eos = tokenizer.eos_token_id
    assert out["prompt_input_ids"] == tokenizer("1+1=", add_special_tokens=False).input_ids
    assert out["chosen_input_ids"] == tokenizer("2", add_special_tokens=False).input_ids + [eos]
    assert out["rejected_input_ids"].count(eos) == 1 and out["rejected_input_ids"][-1] == eos


def test_bos_is_added_when_the_tokenizer_adds_it_and_never_doubled():
    tok = bos_tokenizer()
    enc = PairTokenizer(tok)
    bos = tok.bos_token_id
    plain = enc({"prompt": "hi", "chosen": "a", "rejected": "b"}, 0)["prompt_input_ids"]
    assert plain[0] == bos and plain[1] != bos
    already = enc({"prompt": "<|endoftext|>hi", "chosen": "a", "rejected": "b"}, 0)["prompt_input_ids"]
    assert already == plain
    assert bos not in enc({"prompt": "hi", "chosen": "a", "rejected": "b"}, 0)["chosen_input_ids"]


def test_conversational_row_uses_chat_template(tokenizer):
    row = {
        "prompt": [{"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    out = PairTokenizer(tokenizer)(row, 0)
    decode = lambda ids: tokenizer.decode(ids)  # noqa: E731
    assert decode(out["prompt_input_ids"]) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert decode(out["chosen_input_ids"]) == "4<|im_end|>\n"
    assert decode(out["rejected_input_ids"]) == "5<|im_end|>\n"
    full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=False)
    assert decode(out["prompt_input_ids"] + out["chosen_input_ids"]) == full


def test_conversational_rows_without_chat_template_name_the_fix(tokenizer):
    tokenizer.chat_template = None
    row = {
        "prompt": [{"role": "user", "content": "x"}],
        "chosen": [{"role": "assistant", "content": "y"}],
        "rejected": [{"role": "assistant", "content": "z"}],
    }
    with pytest.raises(OrpoError, match="chat template"):
        PairTokenizer(tokenizer)(row, 0)


def test_empty_prompt_gets_a_start_token(tokenizer):
    out = PairTokenizer(tokenizer)({"prompt": "", "chosen": "a", "rejected": "b"}, 0)
    assert out["prompt_input_ids"] == [tokenizer.eos_token_id]


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "p", "chosen": "c"}, r"row 4: missing field 'rejected'"),
        ({"prompt": "p", "chosen": 3, "rejected": "r"}, r"row 4: field 'chosen' must be a string, got int"),
        ({"prompt": "p", "chosen": "  ", "rejected": "r"}, r"row 4: field 'chosen' is empty"),
        (
            {"prompt": [{"role": "user"}], "chosen": [], "rejected": []},
            r"row 4: field 'prompt' message 1 content must be a string",
        ),
        (
            {"prompt": [{"content": "p"}], "chosen": [], "rejected": []},
            r"row 4: field 'prompt' message 1 needs 'role' and 'content'",
        ),
    ],
)
def test_bad_rows_name_the_row_and_field(tokenizer, row, message):
    with pytest.raises(OrpoError, match=message):
        PairTokenizer(tokenizer, source="train.jsonl")(row, 3)


def test_a_string_response_next_to_a_message_prompt_is_the_assistant_message(tokenizer):
    """The one rule of the one row checker (orpo.data.formats), here and when loading: a plain string
    response after a message-list prompt is that assistant message (the tokenizer's own check used to
    reject it while loading accepted it)."""
    prompt = [{"role": "user", "content": "p"}]
    as_text = PairTokenizer(tokenizer)({"prompt": prompt, "chosen": "c", "rejected": "r"}, 0)
    as_messages = PairTokenizer(tokenizer)(
        {
            "prompt": prompt,
            "chosen": [{"role": "assistant", "content": "c"}],
            "rejected": [{"role": "assistant", "content": "r"}],
        },
        0,
    )
    assert as_text == as_messages


def test_truncation_keeps_prompt_end_and_response_start():
    prompt, chosen, rejected = truncate_pair(
        list(range(10)), [20, 21, 22, 23], [30, 31], TruncationLimits(8, 4, 3), bos_id=None
    )
    assert prompt == [6, 7, 8, 9]
    assert chosen == [20, 21, 22] and rejected == [30, 31]
    prompt, chosen, _ = truncate_pair(
        [0] + list(range(1, 10)), [5, 6, 7, 8, 9], [1], TruncationLimits(6, 4, None), bos_id=0
    )
    assert prompt == [0, 7, 8, 9]  # BOS survives keep-end truncation
    assert chosen == [5, 6]  # prompt + response fit max_length


def test_tokenize_dataset_reports_truncations_and_drops(tokenizer, caplog):
    rows = [
        {"prompt": "short", "chosen": "yes", "rejected": "no"},
        {"prompt": "a much longer prompt here", "chosen": "answer", "rejected": "wrong"},
        {"prompt": "p", "chosen": "a very long response indeed", "rejected": "x"},
    ]
    limits = TruncationLimits(max_length=12, max_prompt_length=8, max_completion_length=None)
    with caplog.at_level(logging.WARNING, logger="orpo"):
        ds, report = tokenize_dataset(Dataset.from_list(rows), tokenizer, limits, source="toy")
    assert len(ds) == 3 and report.rows_out == 3
    assert report.prompts_truncated == 1 and report.responses_truncated == 2  # row 2: both
    assert "1 prompts truncated" in caplog.text
    assert all(
        len(p) + max(len(c), len(r)) <= 12
        for p, c, r in zip(
            ds["prompt_input_ids"], ds["chosen_input_ids"], ds["rejected_input_ids"], strict=True
        )
    )


def test_rows_whose_prompt_fills_max_length_are_dropped_with_a_count(tokenizer, caplog):
    rows = [
        {"prompt": "ok", "chosen": "a", "rejected": "b"},
        {"prompt": "x" * 50, "chosen": "a", "rejected": "b"},
    ]
    limits = TruncationLimits(max_length=10, max_prompt_length=None)
    with caplog.at_level(logging.WARNING, logger="orpo"):
        ds, report = tokenize_dataset(Dataset.from_list(rows), tokenizer, limits, source="toy")
    assert len(ds) == 1
    assert report.dropped == {"the prompt fills max_length, no response token fits": 1}
    assert "1 of 2 rows kept" in caplog.text and "1 rows dropped" in caplog.text


def test_nothing_left_is_an_error(tokenizer):
    rows = [{"prompt": "x" * 50, "chosen": "a", "rejected": "b"}]
    with pytest.raises(OrpoError, match="no response token fits in any of the 1 rows") as err:
        tokenize_dataset(Dataset.from_list(rows), tokenizer, TruncationLimits(10, None), source="toy")
    assert "a max_length of at least 51 keeps every row" in str(err.value)


def test_rows_with_no_response_left_are_dropped_not_counted_as_identical(tokenizer):
    """With a max_length the prompts use up, both responses come out empty: those rows are dropped, and the
    report does not also call them identical pairs (check-data printed both, which contradicted itself)."""
    rows = [
        {"prompt": "x" * 50, "chosen": "a", "rejected": "b"},
        {"prompt": "ok", "chosen": "a", "rejected": "b"},
    ]
    _, report = tokenize_dataset(Dataset.from_list(rows), tokenizer, TruncationLimits(10, None), source="toy")
    assert report.identical_pairs == 0 and sum(report.dropped.values()) == 1


def test_identical_chosen_and_rejected_is_a_counted_warning(tokenizer, caplog):
    rows = [
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ]
    with caplog.at_level(logging.WARNING, logger="orpo"):
        ds, report = tokenize_dataset(Dataset.from_list(rows), tokenizer, TruncationLimits(), source="toy")
    assert len(ds) == 2 and report.identical_pairs == 1
    assert "1 rows have identical chosen and rejected" in caplog.text


def test_second_tokenization_of_the_same_data_comes_from_the_cache(tokenizer, tmp_path, monkeypatch):
    rows = [{"prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(20)]
    limits = TruncationLimits(max_length=64, max_prompt_length=32)
    first, _ = tokenize_dataset(Dataset.from_list(rows), tokenizer, limits, cache_dir=tmp_path)
    calls = []
    real_call = PairTokenizer.__call__
    monkeypatch.setattr(
        PairTokenizer, "__call__", lambda self, row, i: calls.append(i) or real_call(self, row, i)
    )
    again, report = tokenize_dataset(Dataset.from_list(rows), tokenizer, limits, cache_dir=tmp_path)
    assert calls == [] and again["chosen_input_ids"] == first["chosen_input_ids"] and report.rows_out == 20
    tokenize_dataset(
        Dataset.from_list(rows),
        tokenizer,
        TruncationLimits(max_length=8, max_prompt_length=4),
        cache_dir=tmp_path,
    )
    assert len(calls) == 20  # other limits, other key: tokenized again


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_long_texts_are_cut_by_characters_first_with_the_same_tokens(tokenizer, conversational):
    """A 50 MB answer peaked at 9.9 GB while tokenized whole before truncation. Texts are cut by characters
    first, at a cap that keeps every token truncation keeps: the tokens equal those of the uncut texts, and
    the tokenizer never sees more than the cap."""
    limits = TruncationLimits(max_length=96, max_prompt_length=32)
    words = "naïve café 東京 🙂 word, " * 2000  # multi-byte characters: several tokens per character here
    row = {"prompt": words + "end?", "chosen": "start " + words, "rejected": "other " + words[::-1]}
    if conversational:
        row = {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
    capped = PairTokenizer(tokenizer, limits=limits)
    seen = []
    real_ids = capped._ids
    capped._ids = lambda text: seen.append(len(text)) or real_ids(text)
    prompt_cap, response_cap = capped.char_caps
    assert prompt_cap < len(words) and response_cap < len(words)
    bos = tokenizer.bos_token_id
    got = truncate_pair(*capped(row, 0).values(), limits, bos)
    expected = truncate_pair(*PairTokenizer(tokenizer)(row, 0).values(), limits, bos)
    assert got == expected
    assert len(got[0]) == 32 and len(got[1]) == 64  # both were truncated: the caps kept enough
    template_text = 200  # what a chat template adds around the contents
    assert max(seen) <= max(prompt_cap, response_cap) + template_text


@pytest.mark.slow
def test_a_50_mb_line_trains_in_bounded_memory(tmp_path):
    """Memory follows the limits, not the file: 20 MB in one answer (4.4 GB peak before the character cut,
    while tokenizing it whole) trains within the memory of a small run."""
    import json
    import subprocess
    import sys

    data = tmp_path / "huge.jsonl"
    with data.open("w") as f:
        f.write(json.dumps({"prompt": "rev abc=", "chosen": "word " * 4_000_000, "rejected": "x"}) + "\n")
        f.write(json.dumps({"prompt": "rev abd=", "chosen": "y", "rejected": "x"}) + "\n")
    command = [sys.executable, "-m", "orpo", "train", "--model", "demo", "--dataset", str(data)]
    command += ["--output-dir", str(tmp_path / "out"), "--max_steps", "1", "--save_strategy", "no"]
    # Measured from a fresh parent, whose only child is the run (this process's children include other tests').
    measure = (
        "import resource, subprocess, sys; done = subprocess.run(sys.argv[1:]); "
        "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    done = subprocess.run(
        [sys.executable, "-c", measure, *command], capture_output=True, text=True, timeout=600
    )
    code, peak_kib = map(int, done.stdout.split()[-2:])
    assert code == 0, done.stderr[-2000:]
    assert "1 rows with a response truncated" in done.stderr
    assert peak_kib / 2**20 < 1.5, f"peak {peak_kib / 2**20:.2f} GiB"
