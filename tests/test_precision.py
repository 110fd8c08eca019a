"""bf16 on the CPU (issue 29): the default follows the CPU's native bf16, an explicit bf16=True trains on the
CPU, learning in bf16 autocast keeps fp32 weights and optimizer states; malloc's heap kept while training."""

import logging

import pytest
import torch

from conftest import make_model, orpo_args
from orpo import ORPOConfig, ORPOTrainer, config, cpu_heap


@pytest.fixture
def cpu_only(monkeypatch):
    """A machine without accelerators, whose CPU has native bf16 (``native(True)``) or not."""
    monkeypatch.setattr(config, "accelerator_present", lambda: False)

    def native(has: bool):
        monkeypatch.setattr(config, "cpu_bf16_native", lambda: "avx512_bf16" if has else None)

    return native


def build(tmp_path, **kwargs):
    return ORPOConfig(output_dir=str(tmp_path), report_to="none", **kwargs)


@pytest.mark.parametrize("native", [True, False])
def test_the_default_is_bf16_exactly_where_the_cpu_has_it(tmp_path, cpu_only, native):
    cpu_only(native)
    args = build(tmp_path)
    assert args.bf16 is native and args.use_cpu is native  # transformers' CPU autocast needs use_cpu
    assert build(tmp_path, use_cpu=True).bf16 is native  # use_cpu means "on the CPU", not "no bf16"
    assert build(tmp_path, bf16=False).bf16 is False
    assert build(tmp_path, fp16=True, use_cpu=True).bf16 is False
    description = config.precision_description(args)
    assert (
        description.startswith("bf16 autocast on the CPU (avx512_bf16)") if native else description == "fp32"
    )
    if native:
        assert "would be faster" in config.precision_description(build(tmp_path, bf16=False))


def test_bf16_true_on_a_cpu_without_bf16_says_so_and_trains_in_fp32(tmp_path, cpu_only, caplog):
    cpu_only(False)
    with caplog.at_level(logging.WARNING, logger="orpo"):
        args = build(tmp_path, bf16=True)  # TRL's default; scripts pass --bf16
    assert args.bf16 is False
    assert [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()] == [
        "bf16=True: this CPU has no native bf16 (no AVX512-BF16 or AMX), so bf16 would be emulated; "
        "training in fp32 instead"
    ]


def test_bf16_true_without_an_accelerator_trains_on_the_cpu(tmp_path, cpu_only):
    cpu_only(True)
    args = build(tmp_path, bf16=True)  # transformers alone stops here: "You need to assign use_cpu"
    assert args.bf16 is True and args.use_cpu is True and args.device.type == "cpu"


def test_the_real_check_reads_torchs_cpu_capability():
    found = config.cpu_bf16_native()
    assert found in (None, "AMX", "avx512_bf16")
    assert (found is not None) == (
        torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    )


def test_bf16_autocast_on_the_cpu_learns_as_fp32_does_with_fp32_master_weights(
    tmp_path, toy_dataset, tokenizer
):
    """bf16 autocast runs (emulated where the CPU lacks bf16, so this runs everywhere): the first step's loss
    within 1e-2 relative of fp32's, weights and AdamW states fp32, the losses falling as in fp32."""
    runs = {}
    for bf16 in (False, True):
        args = orpo_args(
            tmp_path / str(bf16),
            bf16=bf16,
            use_cpu=True,
            max_steps=6,
            learning_rate=3e-3,
            per_device_train_batch_size=4,
            seed=0,
        )
        trainer = ORPOTrainer(model=make_model(), args=args, train_dataset=toy_dataset, tokenizer=tokenizer)
        assert trainer.accelerator.mixed_precision == ("bf16" if bf16 else "no")
        trainer.train()
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
        states = [t for s in trainer.optimizer.state.values() for t in s.values() if t.numel() > 1]
        assert states and all(t.dtype == torch.float32 for t in states)
        runs[bf16] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    fp32, bf16 = runs[False], runs[True]
    assert abs(bf16[0] - fp32[0]) / fp32[0] < 1e-2
    assert bf16[-1] < bf16[0] and fp32[-1] < fp32[0]
    assert abs(bf16[-1] - fp32[-1]) / fp32[-1] < 0.1


class FakeGlibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append(("mallopt", parameter, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_the_heap_is_kept_while_training_and_given_back_after(monkeypatch):
    libc = FakeGlibc()
    monkeypatch.setattr(cpu_heap, "_glibc", lambda: libc)
    with cpu_heap.heap_kept():
        assert libc.calls == [
            ("mallopt", cpu_heap.M_MMAP_MAX, 0),
            ("mallopt", cpu_heap.M_TRIM_THRESHOLD, cpu_heap.KEEP_TRIM_THRESHOLD),
        ]
    assert libc.calls[2:] == [
        ("mallopt", cpu_heap.M_MMAP_MAX, cpu_heap.DEFAULT_MMAP_MAX),
        ("mallopt", cpu_heap.M_TRIM_THRESHOLD, cpu_heap.DEFAULT_TRIM_THRESHOLD),
        ("malloc_trim", 0),
    ]
    libc.calls.clear()
    with pytest.raises(ValueError), cpu_heap.heap_kept():
        raise ValueError  # a failed run gives the heap back too
    assert libc.calls[-1] == ("malloc_trim", 0)
    libc.calls.clear()
    with cpu_heap.heap_kept(active=False):  # a run on an accelerator
        pass
    assert libc.calls == []


def test_a_cpu_run_keeps_the_heap(tmp_path, monkeypatch, model, tokenizer, toy_dataset):
    libc = FakeGlibc()
    monkeypatch.setattr(cpu_heap, "_glibc", lambda: libc)
    args = orpo_args(tmp_path, max_steps=1, per_device_train_batch_size=2)
    ORPOTrainer(model=model, args=args, train_dataset=toy_dataset, tokenizer=tokenizer).train()
    assert ("mallopt", cpu_heap.M_MMAP_MAX, 0) in libc.calls and libc.calls[-1] == ("malloc_trim", 0)


def test_the_real_glibc_takes_the_settings():
    libc = cpu_heap._glibc()
    if libc is None:
        pytest.skip("not glibc: heap_kept does nothing here")
    with cpu_heap.heap_kept():
        big = torch.ones(64 * 2**20 // 4)  # above any mmap threshold: from the heap now
        del big
    assert libc.mallopt(cpu_heap.M_MMAP_MAX, cpu_heap.DEFAULT_MMAP_MAX) == 1


@pytest.mark.parametrize("hidden", [64, 256])
def test_the_cpu_default_is_settled_on_the_models_width(tmp_path, cpu_only, tokenizer, toy_dataset, hidden):
    cpu_only(True)
    args = orpo_args(tmp_path, bf16=None, max_steps=1)
    assert args.bf16 is True  # before the model is known
    model = make_model(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4)
    trainer = ORPOTrainer(model=model, args=args, train_dataset=toy_dataset, tokenizer=tokenizer)
    wide = hidden >= config.CPU_BF16_MIN_HIDDEN
    assert trainer.args.bf16 is wide and trainer.accelerator.mixed_precision == ("bf16" if wide else "no")
    if not wide:
        assert config.precision_description(trainer.args).startswith(
            "fp32 (the CPU's bf16 default is off for this model: hidden size 64 < 256"
        )
    explicit = orpo_args(tmp_path / "explicit", bf16=True, max_steps=1)
    trainer = ORPOTrainer(model=make_model(), args=explicit, train_dataset=toy_dataset, tokenizer=tokenizer)
    assert trainer.args.bf16 is True and trainer.accelerator.mixed_precision == "bf16"  # asked for: kept


def test_orpo_train_prints_and_records_the_settled_choice(tmp_path, cpu_only, capsys):
    import yaml

    from conftest import demo_train_argv
    from orpo.cli import main

    cpu_only(True)
    assert main(demo_train_argv(tmp_path / "run", max_steps=1)) == 0
    printed = capsys.readouterr().out
    assert "\n  bf16: true\n" in printed  # the config as resolved before the model is known ...
    assert "precision: fp32 (the CPU's bf16 default is off for this model: hidden size 64" in printed
    assert (
        yaml.safe_load((tmp_path / "run" / "orpo_config.yaml").read_text())["bf16"] is False
    )  # ... as trained
