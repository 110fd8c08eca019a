"""Names older transformers (4.38 … 5.14) and TRL (0.8 … 0.29) releases had, read from Python, from
``HfArgumentParser`` command lines and from config files (issue 27 item 2): renamed ones mapped with a note,
removed meaningless ones accepted with a note, removed meaningful ones mapped or refused with what to write."""

import dataclasses
import logging
from pathlib import Path

import pytest
from transformers import HfArgumentParser, TrainingArguments

from orpo import ORPOConfig
from orpo.cli.run_config import resolve
from orpo.config import accelerator_present
from orpo.errors import OrpoError, UsageError
from orpo.legacy_args import LEGACY_ARGS, translate

README = Path(__file__).resolve().parents[1] / "README.md"


def config(tmp_path, **kwargs):
    return ORPOConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


MAPPED = [
    ({"evaluation_strategy": "steps", "eval_steps": 0.2}, {"eval_strategy": "steps"}),
    ({"no_cuda": True}, {"use_cpu": True}),
    (
        {"per_gpu_train_batch_size": 3, "per_gpu_eval_batch_size": 5},
        {"per_device_train_batch_size": 3, "per_device_eval_batch_size": 5},
    ),
    ({"push_to_hub_model_id": "m", "push_to_hub_organization": "org"}, {"hub_model_id": "org/m"}),
    ({"push_to_hub_token": "secret"}, {"hub_token": "secret"}),
    ({"warmup_ratio": 0.1}, {"warmup_steps": 0.1}),
    ({"warmup_ratio": 0.1, "warmup_steps": 7}, {"warmup_steps": 7}),  # as in 4.x: steps win
    ({"group_by_length": True}, {"train_sampling_strategy": "group_by_length"}),
    ({"adafactor": True}, {"optim": "adafactor"}),
    ({"include_inputs_for_metrics": True}, {"include_for_metrics": ["inputs"]}),
    ({"include_tokens_per_second": True}, {"include_num_input_tokens_seen": "all"}),
    ({"max_target_length": 64}, {"max_completion_length": 64}),
    ({"torchdynamo": "eager"}, {"torch_compile_backend": "eager", "torch_compile": True}),
    ({"optim": "adamw_hf"}, {"optim": "adamw_torch"}),
    ({"split_batches": True}, {"accelerator_config": {"split_batches": True}}),
    (
        {"fsdp_min_num_params": 1000, "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer"},
        {"fsdp_config": {"min_num_params": 1000, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}},
    ),
]


@pytest.mark.parametrize(("old", "now"), MAPPED, ids=[next(iter(o)) for o, _ in MAPPED])
def test_renamed_and_replaced_names_map_to_todays_with_a_note(tmp_path, caplog, old, now):
    with caplog.at_level(logging.WARNING, logger="orpo"):
        args = config(tmp_path, **old)
    for name, value in now.items():
        got = getattr(args, name)
        got = got.value if hasattr(got, "value") else got
        if name == "accelerator_config":
            got = {"split_batches": got.split_batches}
        if name == "fsdp_config":
            got = {key: got[key] for key in value}
        assert got == value, name
    assert any(next(iter(old)) in record.getMessage() for record in caplog.records)


IGNORED = {
    "use_mps_device": False,
    "fp16_backend": "auto",
    "half_precision_backend": "cpu_amp",
    "fp16_opt_level": "O1",
    "save_safetensors": True,
    "past_index": -1,
    "ray_scope": "last",
    "tp_size": 0,
    "use_ipex": True,
    "jit_mode_eval": False,
    "mp_parameters": "",
    "tpu_num_cores": None,
    "use_legacy_prediction_loop": False,
    "truncation_mode": "keep_end",
    "label_pad_token_id": -100,
    "dispatch_batches": None,
    "tpu_metrics_debug": False,
}


@pytest.mark.parametrize("name", sorted(IGNORED))
def test_removed_names_with_a_meaningless_value_are_accepted_with_a_note(tmp_path, caplog, name):
    with caplog.at_level(logging.WARNING, logger="orpo"):
        config(tmp_path, **{name: IGNORED[name]})
    assert any(
        f"{name}=" in record.getMessage() and "ignored" in record.getMessage() for record in caplog.records
    )


REFUSED = [
    ({"use_mps_device": True}, "this machine does not have"),
    ({"fp16_backend": "apex"}, "write fp16=True or bf16=True"),
    ({"save_safetensors": False}, "remove save_safetensors=False"),
    ({"truncation_mode": "keep_start"}, "keep their end"),
    ({"tp_size": 2}, "parallelism_config"),
    ({"warmup_ratio": 1.0}, "warmup_steps=0.999"),
    ({"past_index": 0}, "remove it"),
    ({"ray_scope": "all"}, "RAY_SCOPE=all"),
    ({"evaluation_strategy": "steps", "eval_strategy": "epoch"}, "give only eval_strategy"),
    ({"no_cuda": True, "use_cpu": False}, "use_cpu=False is given too"),
]


@pytest.mark.parametrize(
    ("old", "message"), REFUSED, ids=[f"{next(iter(o))}={next(iter(o.values()))}" for o, _ in REFUSED]
)
def test_removed_names_with_a_meaningful_value_say_what_to_write(tmp_path, old, message):
    with pytest.raises(OrpoError) as raised:
        config(tmp_path, **old)
    assert message in str(raised.value) and next(iter(old)) in str(raised.value)


def test_every_old_name_is_absent_from_todays_libraries_and_covered_here():
    """The table holds only names the installed TrainingArguments and ORPOConfig no longer have (so none
    shadows a field), and the tests above try each of them."""
    current = {f.name for f in dataclasses.fields(ORPOConfig)} | {
        f.name for f in dataclasses.fields(TrainingArguments)
    }
    names = {arg.name for arg in LEGACY_ARGS}
    assert not names & current
    tried = {name for old, _ in MAPPED for name in old} | set(IGNORED) | {next(iter(o)) for o, _ in REFUSED}
    tried |= {"push_to_hub_organization"}  # below
    assert names - {"logging_dir"} <= tried


def test_logging_dir_is_tensorboards_environment_variable(tmp_path, monkeypatch):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    config(tmp_path, logging_dir=str(tmp_path / "logs"))
    import os

    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "logs")


def test_hf_argument_parser_takes_bare_boolean_flags_and_old_flag_names(tmp_path):
    """TRL 0.8's documented command lines: ``--bf16`` bare (our bf16 is ``bool | None``, which the parser gave
    no bare form), and ``--evaluation_strategy steps`` (an alias of eval_strategy now)."""
    parser = HfArgumentParser(ORPOConfig)
    base = ["--output_dir", str(tmp_path), "--report_to", "none", "--use_cpu"]
    (args,) = parser.parse_args_into_dataclasses(
        [*base, "--bf16", "--evaluation_strategy", "steps", "--prefix_sharing"]
    )
    assert args.bf16 is True and args.eval_strategy.value == "steps" and args.prefix_sharing is True
    (args,) = parser.parse_args_into_dataclasses([*base, "--bf16", "false"])
    assert args.bf16 is False and args.prefix_sharing is None
    assert not any(f.metadata.get("nargs") for f in dataclasses.fields(TrainingArguments) if f.name == "bf16")


def test_config_files_read_the_same_table():
    run = resolve(
        {
            "model": "demo",
            "datasets": "demo:train",
            "evaluation_strategy": "steps",
            "eval_steps": 5,
            "use_mps_device": False,
            "warmup_ratio": 0.05,
        }
    )
    assert run.args.eval_strategy.value == "steps" and run.args.warmup_steps == 0.05
    assert any("evaluation_strategy" in note and "eval_strategy" in note for note in run.notes)
    assert any("use_mps_device=False" in note for note in run.notes)
    with pytest.raises(UsageError, match="config key fp16_backend='apex'"):
        resolve({"model": "demo", "datasets": "demo:train", "fp16_backend": "apex"})


def test_translate_leaves_current_names_alone():
    values = {"learning_rate": 1e-5, "eval_strategy": "steps"}
    assert translate(values) == (values, [])


def test_readme_lists_every_old_name():
    section = README.read_text().split("## Coming from TRL", 1)[1].split("\n## ", 1)[0]
    for arg in LEGACY_ARGS:
        assert f"`{arg.name}`" in section, arg.name


@pytest.mark.skipif(accelerator_present(), reason="a machine with an accelerator trains bf16 on it")
def test_bf16_without_an_accelerator_trains_on_the_cpu_in_bf16(tmp_path):
    """A bare ``--bf16`` (TRL 0.8's commands) on a CPU-only machine: transformers refuses bf16 there unless told
    use_cpu; orpo says so and sets it."""
    args = config(tmp_path, bf16=True)
    assert args.bf16 is True and args.use_cpu is True


def test_an_organization_alone_names_the_repository_after_the_output_dir(tmp_path):
    args = config(tmp_path / "my-run", push_to_hub_organization="org")
    assert args.hub_model_id == "org/my-run"


def test_old_names_merge_into_the_values_already_given():
    """A string where a list goes (fsdp_config's layer classes, include_for_metrics), a list for debug and an
    AcceleratorConfig are extended, not split into characters or crashed on."""
    from transformers.trainer_pt_utils import AcceleratorConfig

    values, _ = translate(
        {
            "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
            "fsdp_config": {"transformer_layer_cls_to_wrap": "MistralDecoderLayer"},
            "include_inputs_for_metrics": True,
            "include_for_metrics": "loss",
            "tpu_metrics_debug": True,
            "debug": ["underflow_overflow"],
            "split_batches": True,
            "accelerator_config": AcceleratorConfig(dispatch_batches=False),
        }
    )
    assert values["fsdp_config"]["transformer_layer_cls_to_wrap"] == [
        "MistralDecoderLayer",
        "LlamaDecoderLayer",
    ]
    assert values["include_for_metrics"] == ["loss", "inputs"]
    assert values["debug"] == ["underflow_overflow", "tpu_metrics_debug"]
    assert values["accelerator_config"]["split_batches"] is True
    assert values["accelerator_config"]["dispatch_batches"] is False
    with pytest.raises(OrpoError, match="moved into fsdp_config"):
        translate({"fsdp_min_num_params": 10, "fsdp_config": "fsdp.json"})


def test_tokens_never_appear_in_messages():
    with pytest.raises(OrpoError) as raised:
        translate({"push_to_hub_token": "hf_first", "hub_token": "hf_second"})
    assert "hf_first" not in str(raised.value) and "hf_second" not in str(raised.value)
    _, notes = translate({"push_to_hub_token": "hf_first"})
    assert "hf_first" not in " ".join(notes)


def test_a_new_name_given_as_none_is_not_a_conflict():
    values, _ = translate({"evaluation_strategy": "steps", "eval_strategy": None})
    assert values["eval_strategy"] == "steps"
