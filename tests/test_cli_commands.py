"""orpo eval / generate / plot on a model trained for a few steps by orpo train."""

import json
import logging
import subprocess
import sys

import pytest

from conftest import demo_train_argv
from orpo.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(demo_train_argv(out, max_steps=4, logging_steps=1, save_strategy="no")) == 0
    return out


def test_eval_prints_trl_named_metrics_as_json(trained, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(trained), "--data", "demo:test", "--alpha", "0.5", "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in (
        "eval_rewards/accuracies",
        "eval_rewards/margins",
        "eval_logps/chosen",
        "eval_logps/rejected",
        "eval_nll_loss",
        "eval_loss",
    ):
        assert isinstance(metrics[key], float)
    assert metrics["eval_rewards/chosen"] == pytest.approx(0.5 * metrics["eval_logps/chosen"])


def test_eval_table(trained, capsys):
    capsys.readouterr()
    assert main(["eval", "--model", str(trained), "--data", "demo:test"]) == 0
    out = capsys.readouterr().out
    # the run saved orpo_config.yaml beside its model: eval scores with its alpha (0.1, the default it trained with)
    assert (
        f"(200 pairs, alpha=0.1 from {trained / 'orpo_config.yaml'})" in out
        and "eval_rewards/accuracies" in out
    )


def test_generate_streams_a_completion_for_each_prompt(trained, tmp_path, capsys):
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                str(trained),
                "--prompt",
                "rev abc=",
                "--no-chat-template",
                "--max-new-tokens",
                "5",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() != ""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("rev abc=\nrev xyz=\n")
    assert (
        main(
            [
                "generate",
                "--model",
                str(trained),
                "--prompts",
                str(prompts),
                "--max-new-tokens",
                "3",
                "--temperature",
                "0.7",
                "--top-p",
                "0.9",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "> rev abc=" in out and "> rev xyz=" in out
    assert main(["generate", "--model", str(trained)]) == 2
    assert "give one of --prompt" in capsys.readouterr().err


def test_plot_overlays_runs_into_a_png(trained, tmp_path, capsys):
    target = tmp_path / "curves.png"
    assert main(["plot", str(trained), str(trained), "--output", str(target)]) == 0
    assert target.read_bytes().startswith(b"\x89PNG")
    assert main(["plot", str(tmp_path), "--output", str(target)]) == 1  # nothing to plot: a runtime failure
    assert "no trainer_state.json" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fly"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "flag,level", [("--quiet", logging.ERROR), ("--verbose", logging.INFO), (None, logging.WARNING)]
)
def test_quiet_and_verbose_set_the_log_level(flag, level, capsys, tmp_path):
    from transformers.utils import logging as hf_logging

    # a command sets the level as it starts (bare `orpo` only prints the help, without loading anything)
    assert main([*([flag] if flag else []), "plot", str(tmp_path)]) == 1
    assert logging.getLogger("orpo").level == level
    assert hf_logging.get_verbosity() == level
    assert "no trainer_state.json" in capsys.readouterr().err
    # bitsandbytes' import-time note about an optional CPU kernel from the hub shows only with --verbose
    bnb_level = logging.INFO if flag == "--verbose" else logging.ERROR
    assert logging.getLogger("bitsandbytes.backends.cpu.ops").level == bnb_level


def test_help_and_version_answer_without_loading_torch():
    """``orpo --help`` took 6-8 s when the package imported the trainer eagerly."""
    code = (
        "import sys\n"
        "from orpo.cli import main\n"
        "for argv in (['--version'], ['--help'], ['train', '--help'], ['fly']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "orpo 0." in done.stdout and "quickstart" in done.stdout
    assert done.stdout.splitlines()[-1] == "[]"


def test_the_package_exports_load_on_first_use():
    import orpo
    import orpo.loss
    import orpo.trainer

    assert orpo.ORPOTrainer is orpo.trainer.ORPOTrainer and orpo.orpo_loss is orpo.loss.orpo_loss
    assert set(orpo.__all__) <= set(dir(orpo))
    assert all(getattr(orpo, name) is not None for name in orpo.__all__)
    with pytest.raises(AttributeError, match="no attribute 'ORPOTrainr'"):
        orpo.ORPOTrainr  # noqa: B018


def test_eval_split_of_a_saved_dataset_dict(trained, tmp_path, capsys):
    from datasets import Dataset, DatasetDict

    rows = Dataset.from_list([{"prompt": "rev ab=", "chosen": "ba", "rejected": "ab"}] * 3)
    DatasetDict({"validation": rows}).save_to_disk(str(tmp_path / "dd"))
    capsys.readouterr()
    assert (
        main(["eval", "--model", str(trained), "--data", str(tmp_path / "dd"), "--split", "validation"]) == 0
    )
    assert "(3 pairs, alpha=0.1 from" in capsys.readouterr().out
    assert main(["eval", "--model", str(trained), "--data", str(tmp_path / "dd")]) == 1
    assert "not 'test'" in capsys.readouterr().err


@pytest.mark.slow
def test_json_output_is_the_only_thing_on_stdout(tmp_path):
    """As a user pipes it (`orpo --quiet eval ... --json | python -m json.tool`), in a fresh process: DeepSpeed,
    installed with the test extras, announces its accelerator on stdout when accelerate imports it."""
    cmd = [
        sys.executable,
        "-m",
        "orpo",
        "--quiet",
        "eval",
        "--model",
        "demo",
        "--data",
        "demo:test",
        "--json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads(done.stdout)  # nothing but the JSON
    assert "eval_rewards/accuracies" in metrics


def test_plot_draws_evaluation_curves_where_they_were_logged():
    """Evaluations logged beside training steps get their own dashed line in the run's colour."""
    from orpo.plot import curves

    history = [
        {"step": 1, "loss": 2.0, "rewards/accuracies": 0.5},
        {"step": 2, "loss": 1.5, "rewards/accuracies": 0.6},
        {"step": 2, "eval_loss": 1.7, "eval_rewards/accuracies": 0.55},
    ]
    drawn = {(c.panel, c.evaluation): c for c in curves([("run", history)])}
    assert drawn[("loss", False)].values == [2.0, 1.5]
    assert drawn[("loss", True)].steps == [2] and drawn[("loss", True)].values == [1.7]
    assert drawn[("rewards/accuracies", True)].label == "run (eval)"
    assert ("rewards/margins", True) not in drawn  # not logged: not drawn


def test_eval_scores_with_the_models_training_settings_unless_told_otherwise(tmp_path, capsys):
    """`orpo eval` used alpha 0.1 whatever the model was trained with, so the help's own example printed other
    margins than the quickstart's comparison.json for the same model. It now reads the orpo_config.yaml saved
    beside the model, and says where alpha came from."""
    from orpo.demo import demo_tokenizer, tiny_model

    model_dir = tmp_path / "m"
    tiny_model().save_pretrained(str(model_dir))
    demo_tokenizer().save_pretrained(str(model_dir))
    (model_dir / "orpo_config.yaml").write_text("model: demo\norpo_alpha: 0.5\nmax_length: 64\n")
    argv = ["eval", "--model", str(model_dir), "--data", "demo:test"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert f"alpha=0.5 from {model_dir / 'orpo_config.yaml'}" in table
    assert main([*argv, "--alpha", "0.25", "--json"]) == 0
    scored = capsys.readouterr()
    assert "alpha=0.25 from --alpha" in scored.err
    ours = json.loads(scored.out)
    assert main([*argv, "--json"]) == 0
    theirs = json.loads(capsys.readouterr().out)
    assert ours["eval_rewards/margins"] == pytest.approx(
        theirs["eval_rewards/margins"] / 2
    )  # rewards are alpha * l


def test_generate_prompts_a_model_as_it_was_trained(trained, tmp_path, capsys):
    """A model trained on plain text answers differently through a chat template (the quickstart's 'rev abcd='
    gave 'vasss' with it, 'dcba' without): the trainer records how its prompts were rendered beside the model,
    generate follows the record unless a flag says otherwise, and says which way the prompt went in."""
    from datasets import Dataset

    from conftest import toy_rows
    from orpo import ORPOConfig, ORPOTrainer
    from orpo.demo import demo_tokenizer, tiny_model
    from orpo.run_folder import PROMPT_FORMAT_FILE

    assert json.loads((trained / PROMPT_FORMAT_FILE).read_text()) == {"chat_template": False}
    argv = ["generate", "--model", str(trained), "--prompt", "rev abcd=", "--max-new-tokens", "3"]
    assert main(argv) == 0
    assert "without a chat template: the model was trained on plain text" in capsys.readouterr().err
    assert main([*argv, "--chat-template"]) == 0
    assert "through the tokenizer's chat template: --chat-template" in capsys.readouterr().err

    def chat(text: str, role: str) -> list[dict]:
        return [{"role": role, "content": text}]

    rows = [
        {"prompt": chat(r["prompt"], "user"), "chosen": chat(r["chosen"], "assistant"),
         "rejected": chat(r["rejected"], "assistant")}
        for r in toy_rows(4)
    ]  # fmt: skip
    args = ORPOConfig(output_dir=str(tmp_path / "chat"), max_steps=1, report_to="none", use_cpu=True)
    trainer = ORPOTrainer(
        tiny_model(), args, train_dataset=Dataset.from_list(rows), tokenizer=demo_tokenizer()
    )
    trainer.train()
    trainer.save_model()
    chat_argv = [
        "generate",
        "--model",
        str(tmp_path / "chat"),
        "--prompt",
        "rev abcd=",
        "--max-new-tokens",
        "3",
    ]
    assert main(chat_argv) == 0
    assert "through the tokenizer's chat template: the model was trained on chat-templated prompts" in (
        capsys.readouterr().err
    )
    assert main([*chat_argv, "--no-chat-template"]) == 0
    assert "without a chat template: --no-chat-template" in capsys.readouterr().err
    (tmp_path / "chat" / PROMPT_FORMAT_FILE).unlink()  # a model orpo did not train: the tokenizer decides
    assert main(chat_argv) == 0
    assert "through the tokenizer's chat template: the tokenizer has one" in capsys.readouterr().err


def test_a_mistyped_config_key_is_reported_without_loading_torch(tmp_path):
    """A typo in a config file (or a --key) took 11-13 s to report, importing torch and transformers to learn
    the valid names; they are read from the source now (the message is the same)."""
    config = tmp_path / "typo.yaml"
    config.write_text("model: demo\ndatasets: demo:train\nlearning_rat: 1\n")
    code = (
        "import sys\n"
        "from orpo.cli import main\n"
        f"assert main(['train', {str(config)!r}]) == 2\n"
        "assert main(['train', '--model', 'demo', '--dataset', 'demo:train', '--lerning_rate', '1']) == 2\n"
        "assert main([]) == 0\n"
        "print(sorted(m for m in ('torch', 'peft', 'accelerate') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"
    assert "unknown config key 'learning_rat' (did you mean 'learning_rate'?)" in done.stderr
    assert "unknown config key 'lerning_rate'" in done.stderr


@pytest.mark.parametrize("command", ["generate", "eval", "merge", "plot", "quickstart"])
def test_help_never_breaks_a_flag_across_lines(command, capsys, monkeypatch):
    """argparse's default wrapping breaks at hyphens: '--no-chat-' at a line's end, 'template' on the next."""
    import re

    monkeypatch.setenv("COLUMNS", "50")
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert not re.search(r"\S-\n", text), text


def test_global_options_work_after_the_command_too(tmp_path, capsys):
    """`orpo train CONFIG --verbose` (issue 23 item 16: a re-run with --verbose added after the command said
    "unknown config key 'verbose'", since train reads unknown --flags as config keys). --quiet, --verbose and
    --debug are accepted before or after the command; given only before, the command's parser keeps them."""
    from orpo.cli import build_parser

    parser = build_parser()
    for argv in (["--verbose", "plot", "run"], ["plot", "run", "--verbose"]):
        args = parser.parse_args(argv)
        assert (args.verbose, args.quiet, args.debug) == (True, False, False), argv
    assert parser.parse_args(["--debug", "plot", "run", "--quiet"]).debug is True
    config = tmp_path / "run.yaml"
    config.write_text(f"model: demo\ndatasets: demo:test\nmax_steps: 1\noutput_dir: {tmp_path / 'out'}\n")
    assert main(["train", str(config), "--verbose", "--save_strategy", "no"]) == 0
    assert "unknown config key" not in capsys.readouterr().err


def test_eval_scores_the_nll_as_the_model_was_trained(tmp_path):
    """nll_include_prompt became True by default (issue 27): a model with a settings file that records it is
    scored so; one whose file predates the change (no such key) as it was trained, response only; one with no
    file, with today's default; --no-nll-include-prompt decides."""
    import argparse

    from orpo.cli.evaluate import _settings

    def settings(text, *flags):
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        folder.mkdir()
        if text is not None:
            (folder / "orpo_config.yaml").write_text(text)
        nll = {"--no-nll-include-prompt": False}.get(flags[0]) if flags else None
        args = argparse.Namespace(
            model=str(folder),
            alpha=None,
            beta=None,
            nll_include_prompt=nll,
            max_length=None,
            max_prompt_length=None,
        )
        return _settings(args)[0]["nll_include_prompt"]

    assert settings("orpo_alpha: 0.1\nnll_include_prompt: true\n") is True
    assert settings("orpo_alpha: 0.1\n") is False
    assert settings(None) is True
    assert settings("nll_include_prompt: true\n", "--no-nll-include-prompt") is False
