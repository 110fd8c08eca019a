"""orpo.run_folder from Python: ``ORPOTrainer.train`` gets the command line's guarantees — the folder locked
against a second run, a resume from the newest complete checkpoint with the settings it started with — and a
new run into a folder that holds an earlier one starts over there (as re-running a notebook cell means)
without leaving the earlier run's checkpoints for a later resume to pick up."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import make_model, orpo_args
from orpo import ORPOTrainer, run_folder
from orpo.errors import OrpoError, UsageError


def _trainer(tmp_path, tokenizer, dataset, **options):
    args = orpo_args(tmp_path, max_steps=2, per_device_train_batch_size=4, seed=0, **options)
    return ORPOTrainer(model=make_model(), args=args, train_dataset=dataset, tokenizer=tokenizer)


def _hold_lock(folder):
    """Another process holding ``folder``'s lock (a run in progress there) until its stdin closes."""
    code = textwrap.dedent(
        f"""
        import sys
        from orpo import run_folder
        run_folder.lock({str(folder)!r})
        print("locked", flush=True)
        sys.stdin.read()
        """
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path, tokenizer, toy_dataset):
    out = tmp_path / "out"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        trainer = _trainer(tmp_path, tokenizer, toy_dataset)
        with pytest.raises(
            UsageError, match=f"output_dir {out} is in use by another orpo train \\(pid {holder.pid}\\)"
        ):
            trainer.train()
        assert not (out / run_folder.SETTINGS_FILE).exists()  # refused before anything was written
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    trainer.train()  # the other run ended: the folder is free
    holder = _hold_lock(out)  # and train() gave the lock back when it ended
    holder.stdin.close()
    holder.wait(timeout=60)


def test_a_resume_with_another_learning_rate_is_refused(tmp_path, tokenizer, toy_dataset):
    out = tmp_path / "out"
    saving = dict(save_strategy="steps", save_steps=2, learning_rate=1e-3)
    _trainer(tmp_path, tokenizer, toy_dataset, **saving).train()
    saved = yaml.safe_load((out / run_folder.SETTINGS_FILE).read_text())
    assert saved["learning_rate"] == 1e-3 and saved["seed"] == 0 and saved["max_steps"] == 2
    changed = _trainer(tmp_path, tokenizer, toy_dataset, **{**saving, "learning_rate": 5e-4})
    with pytest.raises(UsageError, match="learning_rate: 0.001 -> 0.0005"):
        changed.train(resume_from_checkpoint=True)
    with pytest.raises(UsageError, match="learning_rate: 0.001 -> 0.0005"):  # a path is checked the same way
        changed.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    # the same settings resume; a later max_steps is no change to the run itself
    longer = orpo_args(tmp_path, max_steps=3, per_device_train_batch_size=4, seed=0, **saving)
    resumed = ORPOTrainer(model=make_model(), args=longer, train_dataset=toy_dataset, tokenizer=tokenizer)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    assert yaml.safe_load((out / run_folder.SETTINGS_FILE).read_text())["max_steps"] == 3


def test_resume_true_takes_the_newest_complete_checkpoint(tmp_path, tokenizer, toy_dataset, caplog):
    out = tmp_path / "out"
    saving = dict(save_strategy="steps", save_steps=1)
    _trainer(tmp_path, tokenizer, toy_dataset, **saving).train()
    (out / "checkpoint-2" / "optimizer.pt").unlink()  # a newest checkpoint Trainer's own choice would take
    resumed = _trainer(tmp_path, tokenizer, toy_dataset, **saving)
    with caplog.at_level("WARNING", logger="orpo"):
        resumed.train(resume_from_checkpoint=True)
    assert "resume_from_checkpoint=True skips checkpoint-2: optimizer.pt is missing" in caplog.text
    assert "resuming from checkpoint-1" in caplog.text
    assert resumed.state.global_step == 2


def test_resume_true_without_a_checkpoint_says_so(tmp_path, tokenizer, toy_dataset):
    with pytest.raises(OrpoError, match="resume_from_checkpoint=True: no checkpoint to resume from"):
        _trainer(tmp_path, tokenizer, toy_dataset).train(resume_from_checkpoint=True)


def test_a_new_run_over_an_earlier_one_starts_over_without_its_checkpoints(
    tmp_path, tokenizer, toy_dataset, caplog
):
    """Re-running a notebook's training cell: the run starts over, and the earlier run's checkpoints go, with
    a warning saying so (left, a later resume_from_checkpoint=True would continue the earlier run from its
    checkpoint-4 instead of this run's checkpoint-2)."""
    out = tmp_path / "out"
    earlier = orpo_args(
        tmp_path, max_steps=4, per_device_train_batch_size=4, save_strategy="steps", save_steps=2
    )
    first = ORPOTrainer(model=make_model(), args=earlier, train_dataset=toy_dataset, tokenizer=tokenizer)
    first.train()
    first.save_model()
    assert (out / "checkpoint-4").is_dir()
    again = _trainer(tmp_path, tokenizer, toy_dataset, save_strategy="steps", save_steps=2)
    with caplog.at_level("WARNING", logger="orpo"):
        again.train()
    assert (
        f"output_dir {out} holds a finished run (its model): this run starts over there; its 2 checkpoint(s)"
        in caplog.text
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert yaml.safe_load((out / run_folder.SETTINGS_FILE).read_text())["max_steps"] == 2


def test_a_refused_resume_leaves_the_folder_unlocked(tmp_path, tokenizer, toy_dataset):
    """A notebook whose resume was refused (a changed setting) must not keep the folder from other runs."""
    out = tmp_path / "out"
    saving = dict(save_strategy="steps", save_steps=2, learning_rate=1e-3)
    _trainer(tmp_path, tokenizer, toy_dataset, **saving).train()
    changed = _trainer(tmp_path, tokenizer, toy_dataset, **{**saving, "learning_rate": 5e-4})
    with pytest.raises(UsageError):
        changed.train(resume_from_checkpoint=True)
    holder = _hold_lock(out)  # another process takes the folder: nothing here holds it
    holder.stdin.close()
    holder.wait(timeout=60)


def test_orpo_train_gives_the_folder_back_when_it_returns(tmp_path):
    """main() called from Python (a notebook, a test) releases its lock when the command ends."""
    from conftest import demo_train_argv
    from orpo.cli import main

    out = tmp_path / "cli"
    assert main(demo_train_argv(out, max_steps=1, per_device_train_batch_size=2, report_to="none")) == 0
    holder = _hold_lock(out)
    holder.stdin.close()
    holder.wait(timeout=60)


def test_resuming_a_checkpoint_of_another_folder_records_that_runs_settings(tmp_path, tokenizer, toy_dataset):
    """A run continued into a new output_dir: its settings file starts from the resumed run's, not from whatever
    the new folder held."""
    saving = dict(save_strategy="steps", save_steps=2, learning_rate=1e-3)
    _trainer(tmp_path, tokenizer, toy_dataset, **saving).train()
    (tmp_path / "out" / run_folder.SETTINGS_FILE).write_text(
        (tmp_path / "out" / run_folder.SETTINGS_FILE).read_text() + "recorded_by: the first run\n"
    )
    elsewhere = orpo_args(
        tmp_path,
        output_dir=str(tmp_path / "next"),
        max_steps=3,
        per_device_train_batch_size=4,
        seed=0,
        **saving,
    )
    resumed = ORPOTrainer(model=make_model(), args=elsewhere, train_dataset=toy_dataset, tokenizer=tokenizer)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    settings = yaml.safe_load((tmp_path / "next" / run_folder.SETTINGS_FILE).read_text())
    assert settings["recorded_by"] == "the first run" and settings["max_steps"] == 3


# ---- what is the user's: entries no run wrote are neither replaced nor removed (issue 31, items 1 and 2) ----


def test_a_users_own_config_json_is_never_overwritten(tmp_path, tokenizer, toy_dataset):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    for overwrite in (False, True):
        with pytest.raises(UsageError, match=r"holds config.json that no run of orpo wrote"):
            _trainer(tmp_path, tokenizer, toy_dataset, overwrite_output_dir=overwrite).train()
    assert (out / "config.json").read_text() == '{"mine": true}'


def test_foreign_entries_are_refused_unless_told_and_then_kept(tmp_path, tokenizer, toy_dataset):
    out = tmp_path / "out"
    _trainer(tmp_path, tokenizer, toy_dataset, save_strategy="steps", save_steps=1).train()
    (out / "checkpoint-best").mkdir()
    (out / "checkpoint-best" / "weights.bin").write_text("mine")
    (out / "checkpoint-notes.txt").write_text("mine")
    with pytest.raises(UsageError, match=r"no run of orpo wrote \(checkpoint-best/, checkpoint-notes.txt\)"):
        _trainer(tmp_path, tokenizer, toy_dataset).train()
    # Told: the run starts over there; the earlier run's checkpoints go, the user's entries stay.
    _trainer(tmp_path, tokenizer, toy_dataset, overwrite_output_dir=True).train()
    assert (out / "checkpoint-best" / "weights.bin").read_text() == "mine"
    assert (out / "checkpoint-notes.txt").read_text() == "mine"
    assert run_folder.checkpoints_in(out) == []  # the earlier run's checkpoint-1, -2 removed


def test_the_command_line_refuses_an_output_dir_inside_a_data_folder(tmp_path, capsys):
    from orpo.cli import main

    data = tmp_path / "data"
    data.mkdir()
    source = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    (data / "rows.jsonl").write_text(source * 4)
    for out in (data, data / "run"):
        argv = [
            "train",
            "--model",
            "demo",
            "--dataset",
            str(data),
            "--output-dir",
            str(out),
            "--max_steps",
            "1",
        ]
        assert main(argv) == 2
        assert f"output_dir {out} is inside the data folder {data}" in capsys.readouterr().err
    assert sorted(p.name for p in data.iterdir()) == ["rows.jsonl"]


def test_a_resume_onto_data_edited_in_place_is_refused(tmp_path, capsys):
    """Issue 31 item 3: the same path, every preference flipped: the content hash of the tokenized rows,
    recorded in the settings file, differs, and --resume says so; the same rows resume."""
    import json

    from orpo.cli import main

    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    argv = ["train", "--model", "demo", "--dataset", str(data), "--output-dir", str(out)]
    argv += [
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "2",
        "--save_steps",
        "2",
        "--disable_tqdm",
        "true",
    ]
    assert main([*argv, "--max_steps", "2"]) == 0
    saved = yaml.safe_load((out / "orpo_config.yaml").read_text())
    assert len(saved[run_folder.DATA_FINGERPRINT]) == 32
    flipped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    data.write_text("".join(json.dumps(r) + "\n" for r in flipped))
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    assert "the training data's rows changed" in capsys.readouterr().err
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*argv, "--resume"]) == 0


def test_a_damaged_settings_file_is_one_line(tmp_path, capsys):
    """Issue 31 item 16: orpo eval names the file and scores with the flags; --resume names the file."""
    from orpo.cli import main

    out = tmp_path / "run"
    argv = ["train", "--model", "demo", "--dataset", "demo:train", "--output-dir", str(out)]
    argv += [
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--save_steps",
        "1",
        "--disable_tqdm",
        "true",
    ]
    assert main(argv) == 0
    (out / "orpo_config.yaml").write_text("orpo_alpha: [1, 2\nmax_length: {")
    capsys.readouterr()
    assert main(["eval", "--model", str(out), "--data", "demo:test", "--json"]) == 0
    err = capsys.readouterr().err
    assert (
        f"{out / 'orpo_config.yaml'} is damaged (line" in err and "scoring with the flags and defaults" in err
    )
    assert main([*argv, "--resume"]) == 1
    assert f"{out / 'orpo_config.yaml'} is damaged" in capsys.readouterr().err
    (out / "orpo_config.yaml").write_text("- just\n- a list\n")
    assert main([*argv, "--resume"]) == 1
    assert "holds a list, not the settings mapping" in capsys.readouterr().err
