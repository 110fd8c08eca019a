import json
import os
import shlex
import signal
from pathlib import Path

import pytest
import yaml

from conftest import demo_train_argv
from orpo.cli import main
from orpo.cli.run_config import read_config_file, resolve
from orpo.config import cpu_bf16_native
from orpo.errors import OrpoError, UsageError

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": "demo", "datasets": "demo:train"}


@pytest.mark.slow
def test_train_from_yaml_writes_model_state_and_resolved_config(tmp_path, capsys, monkeypatch):
    import gc

    import orpo.guards
    from orpo import ORPOTrainer

    alive_at_teardown = []

    def finish_processes():  # records what is still alive when the process group would be torn down
        gc.collect()
        alive_at_teardown.append(sum(isinstance(o, ORPOTrainer) for o in gc.get_objects()))

    monkeypatch.setattr(orpo.guards, "finish_processes", finish_processes)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            str(ROOT / "examples" / "tiny.yaml"),
            "--max_steps",
            "3",
            "--output-dir",
            str(out),
            "--learning_rate",
            "1e-3",
            "--save_strategy",
            "no",
            "--disable_tqdm",
            "true",
        ]
    )
    assert code == 0
    # the clean multi-process exit (orpo.guards) ran once, after the trainer was released
    assert alive_at_teardown == [0]
    assert {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "trainer_state.json",
        "orpo_config.yaml",
    } <= {p.name for p in out.iterdir()}
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    saved = yaml.safe_load((out / "orpo_config.yaml").read_text())
    assert saved["max_steps"] == 3 and saved["learning_rate"] == 1e-3  # overrides win over the file
    assert saved["orpo_alpha"] == 1.0  # from the file
    assert saved["nll_include_prompt"] is True  # the objective is recorded (its default changed in issue 27)
    printed = capsys.readouterr().out
    assert (
        "resolved config:" in printed
        and f"model saved to {out}/" in printed
        and "eval_rewards/accuracies" in printed
    )


def test_saving_the_resolved_config_builds_no_second_orpo_config(monkeypatch):
    """Each TrainingArguments resets accelerate's shared process state as it is built, so a second one
    (once built to read the defaults for orpo_config.yaml) turned multi-process runs into N copies."""
    from orpo.cli.run_config import resolve, to_yaml
    from orpo.config import ORPOConfig

    run = resolve({"model": "demo", "datasets": ["demo:train"], "use_cpu": True, "max_steps": 3})
    built = []
    original = ORPOConfig.__post_init__
    monkeypatch.setattr(ORPOConfig, "__post_init__", lambda self: built.append(self) or original(self))
    saved = yaml.safe_load(to_yaml(run))
    assert built == []
    # what the config set, and the always-shown fields; nothing the config left at its default
    assert saved["use_cpu"] is True and saved["max_steps"] == 3 and saved["orpo_alpha"] == 0.1
    assert "warmup_steps" not in saved
    assert saved["bf16"] is (cpu_bf16_native() is not None)  # the resolved choice, always recorded


@pytest.mark.parametrize(
    "key,value,target",
    [
        ("sequence_len", 256, "max_length"),
        ("cutoff_len", 256, "max_length"),
        ("micro_batch_size", 3, "per_device_train_batch_size"),
        ("num_epochs", 2, "num_train_epochs"),
        ("pref_beta", 0.2, "orpo_alpha"),
        ("beta", 0.2, "orpo_alpha"),
    ],
)
def test_foreign_names_map_with_a_note(tmp_path, key, value, target):
    run = resolve({**BASE, "output_dir": str(tmp_path), "max_prompt_length": 64, key: value})
    assert getattr(run.args, target) == value
    assert any(f"'{key}'" in note and f"'{target}'" in note for note in run.notes)


def test_model_aliases_and_axolotl_dataset_type(tmp_path):
    run = resolve(
        {
            "base_model": "some/model",
            "datasets": [{"path": "a.jsonl", "type": "chatml.intel"}],
            "rl": "orpo",
            "output_dir": str(tmp_path),
        }
    )
    assert run.model == {"name": "some/model"} and run.datasets == [{"path": "a.jsonl", "weight": 1.0}]
    assert any("rl" in note for note in run.notes) and any("chatml.intel" in note for note in run.notes)
    run = resolve({"model_name_or_path": "x", "datasets": "d.jsonl", "output_dir": str(tmp_path)})
    assert run.model["name"] == "x"


@pytest.mark.parametrize(
    "config,message",
    [
        ({**BASE, "learning_rat": 1e-5}, "unknown config key 'learning_rat' .did you mean 'learning_rate'"),
        ({**BASE, "orpo_alpah": 0.1}, "did you mean 'orpo_alpha'"),
        ({**BASE, "learning_rate": "fast"}, "config key 'learning_rate' must be float, got str 'fast'"),
        ({**BASE, "max_steps": 1.5}, "config key 'max_steps' must be int"),
        ({**BASE, "report_to": 5}, "config key 'report_to' must be None | str | list.str., got int 5"),
        ({"datasets": "d.jsonl"}, "the config needs 'model'"),
        ({"model": "demo"}, "the config needs 'datasets'"),
        ({**BASE, "beta": 0.1, "orpo_alpha": 0.2}, "both 'beta' and 'orpo_alpha'"),
        ({**BASE, "datasets": [{"path": "a", "wieght": 2}]}, "unknown keys \\['wieght'\\]"),
        ({**BASE, "model": {"name": "m", "dtyp": "bf16"}}, "unknown keys under 'model'"),
    ],
)
def test_bad_configs_are_clear_errors(config, message):
    with pytest.raises(OrpoError, match=message):
        resolve(config)


def test_a_config_file_gets_every_problem_at_once(tmp_path):
    """The run keys, the data and the ORPOConfig values are checked together: one error lists them all."""
    with pytest.raises(UsageError) as raised:
        resolve(
            {
                "model": "demo",
                "datasets": [{"path": "a.jsonl", "weight": 0}],
                "tokenizer": 5,
                "orpo_beta": 0.0,
                "max_length": 0,
                "output_dir": str(tmp_path),
            }
        )
    message = str(raised.value)
    assert message.startswith("4 problems with the settings:")
    for problem in (
        "dataset a.jsonl: weight must be a number above 0",
        "'tokenizer' must be a name or path, got int 5",
        "orpo_beta must be > 0, got 0.0",
        "max_length must be a positive number of tokens, got 0",
    ):
        assert problem in message
    with pytest.raises(
        UsageError, match="2 problems(.|\n)*needs 'datasets'(.|\n)*config key 'max_steps' must be int"
    ):
        resolve({"model": "demo", "max_steps": 1.5})


def test_cli_errors_exit_non_zero_without_traceback(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "config file" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: demo\ndatasets: demo:train\nlearning_rat: 1\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'learning_rate'" in err and "Traceback" not in err
    assert main(["train", str(bad), "--resume", "--learning_rat", "x"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["check-data", "x.jsonl", "--no-such-flag"])
    assert exit_info.value.code == 2


def test_resume_without_checkpoint_says_so(tmp_path, capsys, monkeypatch):
    """Before the output directory is made, the resolved config written or the model loaded."""
    import orpo.models

    monkeypatch.setattr(orpo.models, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(demo_train_argv(tmp_path / "r", "--resume", max_steps=1))
    assert code == 1
    assert "--resume: no checkpoint to resume from" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_a_finished_run_is_not_overwritten_unless_asked(tmp_path, capsys):
    """Re-running a finished run's command used to overwrite its model silently and leave its later
    checkpoints beside the new ones, for a later --resume to pick up."""
    out = tmp_path / "run"
    argv = demo_train_argv(out, max_steps=4, save_steps=2, per_device_train_batch_size=4)
    assert main(argv) == 0
    model = (out / "model.safetensors").read_bytes()
    assert main(demo_train_argv(out, max_steps=2, save_steps=1, per_device_train_batch_size=4)) == 2
    err = capsys.readouterr().err
    assert (
        "already holds a finished run" in err and "--overwrite_output_dir true" in err and "--resume" in err
    )
    assert (out / "model.safetensors").read_bytes() == model  # untouched
    again = demo_train_argv(
        out, max_steps=2, save_steps=1, per_device_train_batch_size=4, overwrite_output_dir="true"
    )
    assert main(again) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
    ]  # old 4 removed


def test_config_files_parse(tmp_path):
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        raw = read_config_file(path)
        run = resolve({**raw, "output_dir": str(tmp_path)})
        assert run.datasets, path


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    # PyYAML reads `1e-5` as a string (YAML 1.1); a learning rate written that way must still work.
    config = tmp_path / "c.yaml"
    config.write_text("model: demo\ndatasets: demo:train\nlearning_rate: 1e-5\n")
    run = resolve({**read_config_file(config), "output_dir": str(tmp_path)})
    assert run.args.learning_rate == 1e-5


def test_chat_template_from_builtin_name_jinja_or_file(tmp_path):
    from orpo.cli.run_config import BUILTIN_CHAT_TEMPLATES, chat_template_text

    assert chat_template_text("chatml") == BUILTIN_CHAT_TEMPLATES["chatml"]
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert chat_template_text(jinja) == jinja
    template_file = tmp_path / "t.jinja"
    template_file.write_text(jinja)
    assert chat_template_text(str(template_file)) == jinja
    with pytest.raises(OrpoError, match="neither a built-in"):
        chat_template_text("llama-99")


def test_column_mapping_from_a_config_file_reaches_the_data(tmp_path):
    from orpo.data import read_pairs

    config = tmp_path / "c.yaml"
    config.write_text(
        f"model: demo\ndatasets: {ROOT / 'tests' / 'data' / 'stack_exchange.csv'}\n"
        "dataset_columns: {prompt: question, chosen: response_j, rejected: response_k}\n"
    )
    run = resolve({**read_config_file(config), "output_dir": str(tmp_path)})
    pairs = read_pairs(run.datasets, columns=run.args.dataset_columns)
    assert pairs.format == "standard" and pairs.dataset[0]["chosen"] == "Use +."


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_continues(tmp_path, capsys, monkeypatch):
    from orpo.trainer import ORPOTrainer

    out = tmp_path / "run"
    argv = demo_train_argv(out, max_steps=4, save_strategy="no", per_device_train_batch_size=8)
    real_step = ORPOTrainer.training_step
    calls = []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # Ctrl-C in the middle of the third step
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(ORPOTrainer, "training_step", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err
    # The step in flight finishes, then a checkpoint is written and training stops.
    assert f"checkpoint saved in {out}/checkpoint-3" in err
    # the resume hint is this very command (flags included) plus --resume
    assert f"resume with: {shlex.join(['orpo', *argv, '--resume'])}" in err
    assert (out / "checkpoint-3" / "model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # no final model: the run is not finished
    monkeypatch.setattr(ORPOTrainer, "training_step", real_step)
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 4


def test_qlora_example_asks_for_a_4bit_base():
    run = resolve(read_config_file(ROOT / "examples" / "qlora-7b.yaml"))
    assert run.args.model_init_kwargs["load_in_4bit"] is True
    assert run.peft["r"] == 16


def test_config_flag_as_in_trls_cli(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: demo\ndatasets: demo:test\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["train", "--config", str(config), "--max_steps", "1", "--save_strategy", "no"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["train", str(config), "--config", str(tmp_path / "other.yaml")]) == 2
    assert "two config files" in capsys.readouterr().err


def test_every_path_in_a_config_file_is_relative_to_it(tmp_path, monkeypatch):
    """The model folder, like the datasets, is found next to the config file, whatever the current directory."""
    from conftest import make_model
    from orpo.demo import demo_tokenizer

    project = tmp_path / "project"
    make_model().save_pretrained(str(project / "base"))
    demo_tokenizer().save_pretrained(str(project / "base"))
    (project / "run.yaml").write_text(
        "model: base\ndatasets: [demo:train]\nmax_steps: 1\nsave_strategy: 'no'\ndisable_tqdm: true\n"
        f"output_dir: {tmp_path / 'out'}\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", str(project / "run.yaml")]) == 0
    saved = yaml.safe_load((tmp_path / "out" / "orpo_config.yaml").read_text())
    assert saved["model"]["name"] == str(project / "base")


def test_resume_passes_over_incomplete_or_damaged_checkpoints(tmp_path, capsys):
    """A checkpoint without its optimizer state, with a garbage trainer_state.json or a truncated
    model.safetensors is named and passed over for the newest complete one (resuming without the optimizer
    state used to exit 0 having trained elsewhere); with none complete, one line says why."""
    out = tmp_path / "run"
    assert main(demo_train_argv(out, max_steps=6, save_steps=2, per_device_train_batch_size=4)) == 0
    (out / "checkpoint-6" / "optimizer.pt").unlink()
    (out / "checkpoint-4" / "trainer_state.json").write_text("{garbage")
    capsys.readouterr()
    assert (
        main(demo_train_argv(out, "--resume", max_steps=8, save_steps=2, per_device_train_batch_size=4)) == 0
    )
    err = capsys.readouterr().err
    assert "skips checkpoint-6: optimizer.pt is missing" in err
    assert "skips checkpoint-4: trainer_state.json is damaged" in err
    assert "resuming from checkpoint-2" in err
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 8
    for checkpoint in out.glob("checkpoint-*"):
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    assert main(demo_train_argv(out, "--resume", max_steps=10, per_device_train_batch_size=4)) == 1
    err = capsys.readouterr().err
    assert "--resume: no complete checkpoint" in err and "model.safetensors is damaged" in err
    assert "Traceback" not in err


def test_a_second_run_into_the_same_directory_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two `orpo train` into one output directory at once used to both exit 0 with their checkpoints and
    models mixed. The first holds a lock the operating system drops when it ends, however it ends."""
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / ".orpo-train.lock", "a+") as other:  # another run, holding the directory
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        other.write("pid 4242")
        other.flush()
        assert main(demo_train_argv(out, max_steps=1)) == 2
        err = capsys.readouterr().err
        assert "is in use by another orpo train (pid 4242)" in err
        assert not (out / "orpo_config.yaml").exists()
    assert main(demo_train_argv(out, max_steps=1)) == 0  # released: the directory is free again


def test_resume_refuses_changed_settings_and_says_what_it_takes(tmp_path, capsys):
    """A new learning rate on --resume was silently ignored (the scheduler's state wins); a different model or
    data was resumed onto without a word. Settings that can change (max_steps, logging) are taken and named."""
    out = tmp_path / "run"
    base = dict(max_steps=4, save_steps=2, per_device_train_batch_size=4, learning_rate="1e-3")
    assert main(demo_train_argv(out, **base)) == 0
    changed = {**base, "max_steps": 6, "learning_rate": "5e-4"}
    assert main(demo_train_argv(out, "--resume", **changed)) == 2
    err = capsys.readouterr().err
    assert "these settings differ from its orpo_config.yaml: learning_rate: 0.001 -> 0.0005" in err
    assert main(demo_train_argv(out, "--resume", **{**base, "max_steps": 6})) == 0
    assert "note: resuming with max_steps from this command" in capsys.readouterr().out


def test_the_names_read_from_source_are_the_configs_fields():
    """The fast key check reads the field names from the source of ORPOConfig and TrainingArguments; they must
    be exactly the dataclass's, for the installed transformers."""
    import dataclasses

    from orpo.cli.run_config import known_field_names
    from orpo.config import ORPOConfig

    assert known_field_names() == {
        f.name for f in dataclasses.fields(ORPOConfig) if f.init and not f.name.startswith("_")
    }


def test_environment_variables_in_config_paths_are_expanded(tmp_path, monkeypatch):
    """`output_dir: $ORPO_T/run` created a directory literally named '$ORPO_T'."""
    from orpo.cli.run_config import resolve

    monkeypatch.setenv("ORPO_T", str(tmp_path))
    run = resolve({"model": "demo", "datasets": [{"path": "${ORPO_T}/a.jsonl"}], "output_dir": "$ORPO_T/run"})
    assert run.args.output_dir == f"{tmp_path}/run"
    assert run.datasets[0]["path"] == f"{tmp_path}/a.jsonl"


def test_disk_full_while_saving_is_one_line_and_leaves_nothing_half_written(tmp_path, capsys, monkeypatch):
    """torch's zip writer reports a full disk as "[enforce fail at inline_container.cc:672] unexpected pos";
    the previous checkpoint stays usable, the partial one is removed, and leftovers in .incomplete/ from an
    earlier failure are removed when the next run starts."""
    from transformers import Trainer

    out = tmp_path / "run"
    (out / ".incomplete" / "checkpoint-9").mkdir(parents=True)  # left by an earlier killed save
    real = Trainer._save_checkpoint

    def save(self, model, trial):
        if self.state.global_step == 4:
            os.makedirs(os.path.join(self._get_output_dir(trial), "checkpoint-4"), exist_ok=True)
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1024")
        return real(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", save)
    argv = demo_train_argv(out, max_steps=6, save_steps=2, per_device_train_batch_size=4)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "no space left on device while writing checkpoint-4" in err and "checkpoint-2 is intact" in err
    assert "Traceback" not in err
    assert (out / "checkpoint-2" / "model.safetensors").is_file() and not (out / "checkpoint-4").exists()
    assert not (out / ".incomplete").exists()


def test_resume_refuses_a_run_saved_before_the_objective_default_changed(tmp_path):
    """An orpo_config.yaml written before issue 27 has no nll_include_prompt: that run trained on the response
    only, so resuming it under today's default (the prompt too) changes the objective and is refused."""
    from orpo.run_folder import check_resumed_settings as _check_resumed_settings

    saved = tmp_path / "orpo_config.yaml"
    saved.write_text("model: demo\norpo_alpha: 0.1\n")
    with pytest.raises(UsageError, match="nll_include_prompt: False -> True"):
        _check_resumed_settings(saved.parent, "model: demo\norpo_alpha: 0.1\nnll_include_prompt: true\n")
    _check_resumed_settings(saved.parent, "model: demo\norpo_alpha: 0.1\nnll_include_prompt: false\n")
