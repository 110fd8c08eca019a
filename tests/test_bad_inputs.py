"""The fault table: each bad input to ``orpo train`` gives a clear message, a non-zero exit code, no
traceback (without ``--debug``) and no output directory that looks like a finished model."""

import json
from pathlib import Path

import pytest

from conftest import BAD_OPTION_VALUES
from orpo.cli import main
from orpo.demo import TOKENIZER_DIR

DATA = Path(__file__).resolve().parent / "data"
RUN = ["--max_steps", "1", "--disable_tqdm", "true", "--save_strategy", "no"]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def yaml_config(tmp_path, extra):
    lines = ["model: demo", "datasets: demo:test", *extra]
    return ["train", write(tmp_path, "run.yaml", "\n".join(lines) + "\n")]


def not_causal_lm(tmp_path):
    folder = tmp_path / "t5"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8, "num_layers": 1}))
    return str(folder)


def tokenizer_without_template(tmp_path):
    folder = tmp_path / "tok"
    folder.mkdir()
    for file in TOKENIZER_DIR.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    return str(folder)


def pickled_model(tmp_path) -> str:
    """A model folder as older tools wrote it: pickled weights only."""
    from conftest import make_model

    folder = tmp_path / "pickled"
    make_model().save_pretrained(str(folder), safe_serialization=False)
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    if not any(folder.glob("pytorch_model*.bin")):  # a transformers that always writes safetensors
        import torch

        torch.save(make_model().state_dict(), folder / "pytorch_model.bin")
    return str(folder)


def alias_bomb() -> str:
    """Nine levels of nine aliases under a known key: 9**9 values once expanded."""
    lines = [
        "model: demo",
        "datasets: demo:test",
        "model_init_kwargs:",
        "  a0: &a0 [x, x, x, x, x, x, x, x, x]",
    ]
    for level in range(1, 10):
        lines.append(f"  a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def with_bad_second_row(tmp_path, kind: str) -> str:
    """A file or folder whose second row lacks 'rejected', written as ``kind``."""
    from datasets import Dataset

    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": None}]
    path = tmp_path / f"bad.{kind}"
    if kind == "parquet":
        Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "saved":
        Dataset.from_list(rows).save_to_disk(str(path))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        path.write_text("prompt,chosen,rejected\np,a,b\np,a\n")
    return str(path)


def damaged_save_to_disk(tmp_path):
    from datasets import Dataset

    folder = tmp_path / "saved"
    Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}]).save_to_disk(str(folder))
    for arrow in folder.glob("*.arrow"):
        arrow.unlink()
    return str(folder)


# (id, argv builder, exit code, message fragment). Exit 2: the command line or config is wrong;
# exit 1: a failure while working (data, model, tokenizer, state on disk).
def data(name):
    return lambda t: ["train", "--model", "demo", "--dataset", str(DATA / name)]


def flags(*extra):
    return lambda t: ["train", "--model", "demo", "--dataset", "demo:test", *extra]


def no_template(t):
    text = f"model: demo\ntokenizer: {tokenizer_without_template(t)}\ndatasets: {DATA / 'conversational.jsonl'}\n"
    return ["train", write(t, "c.yaml", text)]


# fmt: off
CASES = [
    # config files
    ("config-missing", lambda t: ["train", str(t / "nope.yaml")], 2, "config file"),
    ("config-yaml-syntax", lambda t: ["train", write(t, "x.yaml", "model: [demo\n")], 2, "x.yaml"),
    ("config-not-a-mapping", lambda t: ["train", write(t, "x.yaml", "- a\n- b\n")], 2, "x.yaml"),
    ("config-unknown-key", lambda t: yaml_config(t, ["learning_rat: 1e-5"]), 2, "did you mean 'learning_rate'"),
    ("config-wrong-type", lambda t: yaml_config(t, ["learning_rate: fast"]), 2, "must be float"),
    ("config-float-batch", lambda t: yaml_config(t, ["per_device_train_batch_size: 1.5"]), 2, "must be int"),
    ("config-max-length-negative", lambda t: yaml_config(t, ["max_length: -5"]), 2, "max_length"),
    ("config-beta-and-alpha", lambda t: yaml_config(t, ["beta: 0.1", "orpo_alpha: 0.2"]), 2, "both 'beta' and 'orpo_alpha'"),
    ("config-no-datasets", lambda t: ["train", write(t, "x.yaml", "model: demo\n")], 2, "needs 'datasets'"),
    ("config-duplicate-key", lambda t: yaml_config(t, ["max_steps: 1", "max_steps: 2"]), 2, "key 'max_steps' is given twice (lines 3 and 4)"),
    ("config-lr-negative", lambda t: yaml_config(t, ["learning_rate: -1.0e-5"]), 2, "learning_rate must be >= 0"),
    ("config-batch-zero", lambda t: yaml_config(t, ["per_device_train_batch_size: 0"]), 2, "per_device_train_batch_size must be >= 1"),
    ("config-accumulation-zero", lambda t: yaml_config(t, ["gradient_accumulation_steps: 0"]), 2, "gradient_accumulation_steps must be >= 1"),
    ("config-beta-inf", lambda t: yaml_config(t, ["orpo_beta: .inf"]), 2, "orpo_beta must be a finite number"),
    ("config-alpha-nan", lambda t: yaml_config(t, ["orpo_alpha: .nan"]), 2, "orpo_alpha must be a finite number"),
    *[
        (f"config-weight-{name}", lambda t, w=w: ["train", write(t, "w.yaml", f"model: demo\ndatasets:\n  - {{path: demo:test, weight: {w}}}\n")], 2, "weight must be a number above 0")
        for name, w in (("abc", "abc"), ("nan", ".nan"), ("inf", ".inf"), ("zero", "0"))
    ],
    ("config-unset-variable", lambda t: ["train", write(t, "v.yaml", "model: demo\ndatasets: $ORPO_UNSET_FOR_TEST/x.jsonl\n")], 2, "$ORPO_UNSET_FOR_TEST in '$ORPO_UNSET_FOR_TEST/x.jsonl' is not set"),
    ("config-chat-template-int", lambda t: yaml_config(t, ["chat_template: 5"]), 2, "'chat_template' must be a built-in name, a file or Jinja text, got int 5"),
    ("config-tokenizer-int", lambda t: yaml_config(t, ["tokenizer: 5"]), 2, "'tokenizer' must be a name or path, got int 5"),
    ("config-peft-int", lambda t: yaml_config(t, ["peft: 5"]), 2, "'peft' must be a mapping of LoRA settings"),
    ("config-peft-rank-text", lambda t: yaml_config(t, ["peft: {r: abc}"]), 2, "'peft': r must be int, got str 'abc'"),
    ("config-peft-unknown-key", lambda t: yaml_config(t, ["peft: {rank: 4}"]), 2, "'peft': LoraConfig.__init__() got an unexpected keyword argument 'rank'"),
    ("config-special-tokens-int", lambda t: yaml_config(t, ["special_tokens: {pad_token: 5}"]), 2, "'special_tokens' must map token names to tokens"),
    ("config-columns-string", lambda t: yaml_config(t, ["dataset_columns: question"]), 2, "dataset_columns must map prompt, chosen, rejected, system to your column names"),
    ("config-columns-unknown-role", lambda t: yaml_config(t, ["dataset_columns: {question: prompt}"]), 2, "got {'question': 'prompt'}"),
    ("config-alias-bomb", lambda t: ["train", write(t, "bomb.yaml", alias_bomb())], 2, "expand to more than 100,000 values"),
    ("model-pickled-weights-only", lambda t: ["train", "--model", pickled_model(t), "--dataset", "demo:test"], 1, "holds only pickled weights (pytorch_model*.bin); orpo loads safetensors only"),
    # data files (issue 23 item 14)
    ("data-json-too-deep", lambda t: ["train", "--model", "demo", "--dataset", write(t, "deep.json", "[" * 100_000 + "]" * 100_000)], 1, "nested too deeply"),
    ("data-lone-surrogate", lambda t: ["train", "--model", "demo", "--dataset", write(t, "s.jsonl", '{"prompt": "p", "chosen": "a\\ud800b", "rejected": "c"}\n')], 1, "s.jsonl:1: field 'chosen' holds a lone surrogate"),
    ("data-not-parquet", lambda t: ["train", "--model", "demo", "--dataset", write(t, "x.parquet", "not parquet")], 1, "not a readable Parquet file"),
    # the row is named wherever it is known: file:line for JSONL and CSV, "row N" for JSON, Parquet and
    # save_to_disk folders
    *[
        (f"data-row-named-{kind}", lambda t, k=kind: ["train", "--model", "demo", "--dataset", with_bad_second_row(t, k)], 1, where)
        for kind, where in (("json", "bad.json: row 2: missing field 'rejected'"), ("csv", "bad.csv:3: missing field 'rejected'"),
                            ("parquet", "bad.parquet: row 2: missing field 'rejected'"), ("saved", "bad.saved: row 2: missing field 'rejected'"))
    ],
    ("data-save-to-disk-damaged", lambda t: ["train", "--model", "demo", "--dataset", damaged_save_to_disk(t)], 1, "a save_to_disk folder that cannot be read"),
    ("data-demo-unknown-split", lambda t: ["train", "--model", "demo", "--dataset", "demo:foo"], 1, "demo:foo: the shipped data is demo:train, demo:test, demo:smollm2-train"),
    # command line
    ("cli-flag-wrong-type", flags("--learning_rate", "abc"), 2, "learning_rate"),
    ("cli-output-dir-is-a-file", lambda t: ["train", "--model", "demo", "--dataset", "demo:test", "--output-dir", write(t, "taken", "x")], 2, "is a file, not a directory"),
    ("cli-unknown-flag", flags("--lerning_rate", "1"), 2, "did you mean 'learning_rate'"),
    ("cli-no-model", lambda t: ["train", "--dataset", "demo:test"], 2, "model"),
    ("cli-resume-without-checkpoint", flags("--resume"), 1, "no checkpoint to resume from"),
    # data
    ("data-file-missing", lambda t: ["train", "--model", "demo", "--dataset", str(t / "none.jsonl")], 1, "none.jsonl"),
    ("data-bad-json", data("bad_json.jsonl"), 1, "bad_json.jsonl:2"),
    ("data-missing-field", data("missing_field.jsonl"), 1, "rejected"),
    ("data-null-response", data("null_response.jsonl"), 1, "null_response.jsonl"),
    ("data-non-string", data("non_string.jsonl"), 1, "non_string.jsonl:2"),
    ("data-empty-response", data("empty_response.jsonl"), 1, "empty_response.jsonl:2"),
    ("data-non-utf8", data("non_utf8.jsonl"), 1, "non_utf8.jsonl"),
    ("data-unknown-role", data("unknown_role.jsonl"), 1, "unknown_role.jsonl"),
    ("data-empty-file", lambda t: ["train", "--model", "demo", "--dataset", write(t, "empty.jsonl", "")], 1, "empty.jsonl"),
    # model and tokenizer
    ("model-path-missing", lambda t: ["train", "--model", str(t / "no-model"), "--dataset", "demo:test"], 1, "no-model"),
    ("model-not-causal-lm", lambda t: ["train", "--model", not_causal_lm(t), "--dataset", "demo:test"], 1, "causal"),
    ("tokenizer-no-chat-template", no_template, 1, "chat_template"),
]
# fmt: on
# ORPO option values every path must refuse (the same table tests ORPOConfig from Python)
CASES += [
    (
        f"config-{'-'.join(values)}",
        lambda t, values=values: yaml_config(t, [f"{k}: {v}" for k, v in values.items()]),
        2,
        message,
    )
    for values, message in BAD_OPTION_VALUES
]


@pytest.mark.parametrize("builder,code,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_clear_error(tmp_path, capsys, monkeypatch, builder, code, message):
    monkeypatch.chdir(tmp_path)
    argv = builder(tmp_path)
    out = tmp_path / "out"
    if argv[0] == "train" and "--output-dir" not in argv:
        argv = [*argv, "--output-dir", str(out)]
    assert main([*argv, *RUN]) == code
    err = capsys.readouterr().err
    assert message in err, err[-2000:]
    assert "Traceback" not in err
    assert not (out / "model.safetensors").exists()


def test_the_table_is_long_enough():
    assert len(CASES) >= 25


def test_plot_problems_are_one_line_errors(tmp_path, capsys):
    """An empty run folder, a damaged trainer_state.json, an --output folder that does not exist."""
    (tmp_path / "empty").mkdir()
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "trainer_state.json").write_text("{not json")
    nothing = tmp_path / "nothing"
    nothing.mkdir()
    (nothing / "trainer_state.json").write_text('{"log_history": []}')
    for argv, message in (
        (["plot", str(tmp_path / "empty")], "no trainer_state.json"),
        (["plot", str(damaged)], "not a readable training log"),
        (["plot", str(nothing)], "has no logged training steps"),
        (["plot", str(nothing), "--output", str(tmp_path / "missing" / "c.png")], "does not exist"),
    ):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--model", "demo", "--max-new-tokens", "-1", "--prompt", "x"], "must be at least 1"),
        (["generate", "--model", "demo", "--top-p", "5", "--prompt", "x"], "must be above 0 and at most 1"),
        (["generate", "--model", "demo", "--temperature", "-1", "--prompt", "x"], "a finite number from 0"),
        (["eval", "--model", "demo", "--data", "demo:test", "--batch-size", "0"], "must be at least 1"),
        (["check-data", "demo:test", "--max-length", "0"], "must be at least 1"),
    ],
)
def test_out_of_range_flags_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_prompts_file_that_does_not_exist(tmp_path, capsys):
    assert main(["generate", "--model", "demo", "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_a_csv_field_over_the_csv_modules_default_limit_loads(tmp_path):
    """Long answers are normal: a 200,000-character field stopped the csv module at its 128 KiB default."""
    from orpo.data.sources import load_source

    path = tmp_path / "long.csv"
    path.write_text("prompt,chosen,rejected\np," + "a" * 200_000 + ",b\n")
    assert len(load_source(path).rows[0]["chosen"]) == 200_000


def test_reading_a_csv_leaves_the_csv_modules_limit_as_it_was(tmp_path):
    """The csv module's field limit is global to the process: the loader raises it for its read only."""
    import csv

    from orpo.data.sources import load_source

    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\np,a,b\n")
    before = csv.field_size_limit()
    load_source(path)
    assert csv.field_size_limit() == before


def test_a_run_that_skipped_most_batches_fails(tmp_path, capsys, monkeypatch):
    """With nan_policy skip and every loss non-finite, the run used to exit 0 with train_loss 0.0 and the
    untrained weights saved as the model. (orpo_alpha NaN, the reported case, is now refused up front, so the
    non-finite losses come from a model whose logits are NaN.)"""
    import math

    import orpo.models

    real = orpo.models.load_causal_lm

    def nan_model(*args, **kwargs):
        model = real(*args, **kwargs)
        model.lm_head.register_forward_hook(lambda module, inputs, output: output * math.nan)
        return model

    monkeypatch.setattr(orpo.models, "load_causal_lm", nan_model)
    out = tmp_path / "out"
    argv = ["train", "--model", "demo", "--dataset", "demo:test", "--output-dir", str(out), *RUN]
    argv[argv.index("--max_steps") + 1] = "4"
    assert main([*argv, "--nan_policy", "skip", "--fused_head_loss", "false"]) == 1
    err = capsys.readouterr().err
    assert "nan_policy skip left out 4 of 4 micro-batches" in err
    assert not (out / "model.safetensors").exists()


def test_merge_refuses_its_own_adapter_directory_and_non_empty_ones(tmp_path, capsys):
    """`orpo merge --output ADAPTER_DIR` left adapter and full-model files mixed, and evaluating it applied the
    adapter twice."""
    pytest.importorskip("peft")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "demo"}))
    assert main(["merge", "--adapter", str(adapter), "--output", str(adapter)]) == 2
    assert "is the adapter's own directory" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "something").write_text("x")
    assert main(["merge", "--adapter", str(adapter), "--output", str(busy)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_a_read_only_output_directory_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import os

    import orpo.models

    out = tmp_path / "ro"
    out.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only file system answers
    monkeypatch.setattr(orpo.models, "load_causal_lm", lambda *a, **k: pytest.fail("the model was loaded"))
    argv = ["train", "--model", "demo", "--dataset", "demo:test", "--output-dir", str(out), *RUN]
    assert main(argv) == 1
    assert "is not writable" in capsys.readouterr().err


def test_a_hostile_chat_template_is_one_line_naming_the_row(tmp_path):
    """Issue 31 item 17: the Jinja sandbox refuses a template reaching for Python internals; that is an
    OrpoError naming the source and row, not a SecurityError traceback."""
    from datasets import Dataset

    from orpo.data import TruncationLimits, load_pairs
    from orpo.demo import demo_tokenizer
    from orpo.errors import OrpoError

    tokenizer = demo_tokenizer()
    tokenizer.chat_template = "{% set x = messages.__class__.__base__ %}{{ x.__subclasses__() }}"
    rows = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "chosen": [{"role": "assistant", "content": "a"}],
                "rejected": [{"role": "assistant", "content": "b"}],
            }
        ]
    )
    with pytest.raises(OrpoError, match=r"row 1: the tokenizer's chat template failed \(SecurityError"):
        load_pairs(rows, tokenizer, TruncationLimits(max_length=64), name="rows")


@pytest.fixture
def probing(monkeypatch):
    """orpo.hub's probe as it runs on a machine with no HF_HUB_OFFLINE (the tests set it), at an endpoint."""
    from huggingface_hub import constants

    from orpo import hub

    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(hub, "_go_offline", lambda: None)
    for name in hub.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    hub.offline_reason.cache_clear()

    def probe(endpoint: str):
        monkeypatch.setattr(hub, "_endpoint", lambda: endpoint)
        hub.offline_reason.cache_clear()
        return hub.offline_reason()

    yield probe
    hub.offline_reason.cache_clear()


def test_a_hub_mirror_that_never_answers_is_offline_within_seconds(probing):
    """Issue 31 item 10: a server that accepts connections and sleeps; the probe's request times out."""
    import socket
    import threading
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    held = []
    threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()
    start = time.monotonic()
    reason = probing(f"http://127.0.0.1:{server.getsockname()[1]}")
    assert "does not answer within 3 s" in reason and time.monotonic() - start < 10
    server.close()


@pytest.mark.parametrize("endpoint", ["http://127.0.0.1:99999", "http://[::1", "localhost:8080"])
def test_a_malformed_hf_endpoint_is_one_line(probing, endpoint):
    """Issue 31 item 15."""
    from orpo.errors import OrpoError

    with pytest.raises(OrpoError, match=r"HF_ENDPOINT .* is not a valid URL"):
        probing(endpoint)


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_an_unusable_tokenization_cache_is_a_warning_and_training_goes_on(
    tmp_path, monkeypatch, caplog, where
):
    """Issue 31 item 13: $ORPO_CACHE_DIR is a file, or below one: the rows are tokenized without the cache,
    with one warning naming the folder."""
    from datasets import Dataset

    from orpo.data import TruncationLimits, load_pairs
    from orpo.demo import demo_tokenizer

    blocker = tmp_path / "cache"
    blocker.write_text("not a folder")
    cache = blocker if where == "a file" else blocker / "inside"
    monkeypatch.setenv("ORPO_CACHE_DIR", str(cache))
    rows = Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3)
    with caplog.at_level("WARNING", logger="orpo"):
        tokenized, _ = load_pairs(rows, demo_tokenizer(), TruncationLimits(max_length=32), name="rows")
    assert len(tokenized) == 3
    assert f"the tokenization cache {cache} cannot be used" in caplog.text and "ORPO_CACHE_DIR" in caplog.text


def test_max_length_beyond_learned_positions_is_one_line(tmp_path):
    """Issue 31 item 14: GPT-2's 32 learned positions and max_length 64 (an IndexError mid-step before)."""
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel

    from orpo import ORPOConfig, ORPOTrainer
    from orpo.demo import demo_tokenizer
    from orpo.errors import OrpoError

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=259, n_positions=32))
    args = ORPOConfig(output_dir=str(tmp_path / "o"), max_length=64, report_to="none", bf16=False)
    rows = Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2)
    with pytest.raises(OrpoError, match="max_length 64 is longer than the 32 positions this gpt2 model has"):
        ORPOTrainer(model=model, args=args, train_dataset=rows, tokenizer=demo_tokenizer())
