from pathlib import Path

from orpo.cli import main

DATA = Path(__file__).parent / "data"


def test_check_data_reports_format_lengths_truncation_and_rendering(capsys):
    code = main(
        [
            "check-data",
            str(DATA / "conversational.jsonl"),
            "--tokenizer",
            "demo",
            "--max-length",
            "44",
            "--max-prompt-length",
            "40",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "format:  conversational" in out and "rows:    1 valid" in out
    assert "prompt   p50     42" in out
    assert "1 prompts truncated" in out
    assert "⟦|⟧4<|im_end|>" in out  # the scored response starts right after the generation prompt


def test_check_data_lists_problems_and_exits_non_zero(capsys):
    code = main(["check-data", str(DATA / "many_bad.jsonl")])
    err = capsys.readouterr().err
    assert code == 1  # invalid data: a runtime failure
    assert "many_bad.jsonl:1: field 'chosen' is empty" in err and "... and 2 more" in err
    assert "Traceback" not in err


def test_check_data_column_mapping_and_skip_invalid(capsys):
    assert (
        main(
            [
                "check-data",
                str(DATA / "stack_exchange.csv"),
                "--columns",
                "prompt=question,chosen=response_j,rejected=response_k",
            ]
        )
        == 0
    )
    assert "rows:    2 valid" in capsys.readouterr().out
    assert main(["check-data", str(DATA / "empty_response.jsonl"), "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "rows:    1 valid" in out and "empty_response.jsonl:2: field 'chosen' is empty" in out
    assert main(["check-data", str(DATA / "standard.jsonl"), "--columns", "answer=x"]) == 2
    assert "--columns takes prompt=COL" in capsys.readouterr().err


def test_check_data_hub_name_with_subset_and_split(monkeypatch, capsys):
    from datasets import Dataset

    import orpo.data.sources

    calls = []

    def stand_in(name, subset, split):
        calls.append((name, subset, split))
        return Dataset.from_list([{"prompt": "p", "chosen": "c", "rejected": "r"}])

    monkeypatch.setattr(orpo.data.sources, "load_dataset", stand_in)
    assert main(["check-data", "org/prefs", "--subset", "en", "--split", "train_prefs"]) == 0
    assert calls == [("org/prefs", "en", "train_prefs")]
    assert "source:  org/prefs[train_prefs]" in capsys.readouterr().out


def test_a_max_length_no_response_fits_in_says_what_limit_would(capsys):
    """`orpo check-data` with a --max-length the prompts use up: one line that says no response token fits and
    what max_length would (it said '0 of N kept', 'N identical pairs' and 'N dropped' at once)."""
    argv = ["check-data", "demo:test", "--tokenizer", "demo", "--max-length", "3", "--max-prompt-length", "3"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "test.jsonl: no response token fits in any of the 200 rows" in err
    assert "a max_length of at least 4 keeps every row" in err and "identical" not in err
