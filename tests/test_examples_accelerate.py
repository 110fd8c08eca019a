"""The accelerate / DeepSpeed example configs parse, and say what their README commands promise."""

import importlib.util
import json
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "accelerate"

EXPECTED = {
    "ddp.yaml": (DistributedType.MULTI_GPU, None),
    "ddp-cpu.yaml": (DistributedType.MULTI_GPU, None),
    "fsdp.yaml": (DistributedType.FSDP, None),
    "deepspeed-zero2.yaml": (DistributedType.DEEPSPEED, 2),
    "deepspeed-zero3-lora.yaml": (DistributedType.DEEPSPEED, 3),
}


def test_every_example_is_listed():
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_parses(name):
    config = load_config_from_file(str(EXAMPLES / name))
    kind, zero_stage = EXPECTED[name]
    assert config.distributed_type == kind
    assert config.num_processes >= 2
    if zero_stage is not None:
        assert config.deepspeed_config["zero_stage"] == zero_stage
    if kind == DistributedType.FSDP:
        assert config.fsdp_config["fsdp_version"] == 2
    # the launch command in the file's header points at files that exist
    launch = [line for line in (EXAMPLES / name).read_text().splitlines() if "accelerate launch" in line]
    assert launch, "no launch command in the header"
    for word in launch[0].split():
        if word.startswith("examples/"):
            assert (EXAMPLES.parents[1] / word).exists(), word


@pytest.mark.parametrize("name", ["deepspeed-zero2.yaml", "deepspeed-zero3-lora.yaml"])
def test_deepspeed_accepts_the_zero_config(name):
    if importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed (it is optional: pip install deepspeed)")
    from accelerate.utils import DeepSpeedPlugin

    config = load_config_from_file(str(EXAMPLES / name))
    plugin = DeepSpeedPlugin(
        **{k: v for k, v in config.deepspeed_config.items() if k != "deepspeed_multinode_launcher"}
    )
    ds_config = json.loads(json.dumps(plugin.deepspeed_config))  # a complete, serialisable DeepSpeed config
    assert ds_config["zero_optimization"]["stage"] == config.deepspeed_config["zero_stage"]
    # DeepSpeed's own parser accepts it once the "auto" values are filled in, as accelerate does from the
    # training arguments (here: 1 process x 4 pairs x 2 accumulation steps)
    from deepspeed.runtime.config import DeepSpeedConfig

    filled = {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    filled["gradient_clipping"] = 1.0
    ds_config.update({key: value for key, value in filled.items() if ds_config.get(key) == "auto"})
    parsed = DeepSpeedConfig(ds_config)
    assert parsed.zero_optimization_stage == config.deepspeed_config["zero_stage"]
    assert parsed.train_batch_size == 8
