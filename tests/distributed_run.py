"""A short ORPOTrainer run for the multi-process tests (and benchmarks/bench_sharded_head.py): launched
by ``torchrun`` with 1 or N processes, it writes to ``--out`` the logged history, the final weights (or
adapter), the evaluation (``--eval``) and what the run used: engine.txt, layout.txt, head.txt, cost.json.

    torchrun --nproc_per_node 2 tests/distributed_run.py --out DIR --batch 2 --accum 1 --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from conftest import make_model, toy_rows  # noqa: E402
from orpo import ORPOConfig, ORPOTrainer  # noqa: E402
from orpo.demo import demo_tokenizer  # noqa: E402
from orpo.guards import finish_processes  # noqa: E402


def deepspeed_config(stage: int) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        # Partition every parameter, however small (the tiny model's would all stay whole otherwise),
        # and gather them into the saved model.
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    return {
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
    }


def run_fsdp_on_cpu() -> None:
    """accelerate runs FSDP only on accelerators: on CPU it silently trains with DDP instead (state
    MULTI_CPU, no FSDP plugin). FSDP2 itself runs on CPU with gloo, so for these tests the state is
    switched to FSDP whenever a plugin is given (test harness only; the run writes engine.txt)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = plugin

    AcceleratorState.__init__ = init


def lora_config():
    import peft

    return peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, required=True, help="per-process batch size")
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=None, help="a larger vocabulary (benchmarks)")
    parser.add_argument("--model-head", action="store_true", help="the model's own full logits (benchmarks)")
    parser.add_argument("--eval", action="store_true", help="evaluate every 2 steps and after training")
    parser.add_argument(
        "--generate", action="store_true", help="with --eval: generate_during_eval (short completions)"
    )
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens_per_batch")
    parser.add_argument("--fsdp", action="store_true", help="FSDP full shard (FSDP2)")
    parser.add_argument("--zero", type=int, default=None, help="DeepSpeed ZeRO stage")
    parser.add_argument("--untied", action="store_true", help="a head weight of its own")
    parser.add_argument("--unfused", action="store_true", help="fused_head_loss: false")
    parser.add_argument("--lora", action="store_true", help="train a LoRA adapter")
    parser.add_argument(
        "--packed-shared", action="store_true", help="ask for the packed shared-prefix layout"
    )
    parser.add_argument(
        "--model-dir", default=None, help="load the model from here, by path, after the config"
    )
    parser.add_argument(
        "--unready-rank", type=int, default=None, help="this process cannot check the layout at construction"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fsdp:
        run_fsdp_on_cpu()

    # Built before the config: a ZeRO-3 config makes transformers initialise new models partitioned
    # (zero.Init), which draws other random weights than the 1-process run's. A model loaded by path
    # (--model-dir) is loaded after it, so under ZeRO-3 it is partitioned as it loads, as `orpo train`
    # does it.
    shape = {"tie_word_embeddings": False} if args.untied else {}
    if args.vocab:
        shape["vocab_size"] = args.vocab
    model = args.model_dir or make_model(seed=3, **shape)
    if args.generate:  # completions of a few tokens at least (the trained toy model ends early)
        model.generation_config.min_new_tokens = 4
    if args.model_dir and args.zero == 3:
        # On GPUs accelerate starts DeepSpeed's communication; on CPU it leaves it to torch, and zero.Init
        # would then see 1 process.
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    config = ORPOConfig(
        output_dir=args.out,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.accum,
        max_steps=args.steps,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        orpo_alpha=0.5,
        logging_steps=1,
        **({"eval_strategy": "steps", "eval_steps": 2, "per_device_eval_batch_size": 3} if args.eval else {}),
        **(
            {"generate_during_eval": True, "max_length": 32, "max_prompt_length": 16} if args.generate else {}
        ),
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        activation_checkpointing=args.gradient_checkpointing,
        dataloader_num_workers=0,
        max_tokens_per_batch=args.max_tokens,
        fused_head_loss=not args.unfused,
        **({"padding_free": True, "prefix_sharing": True} if args.packed_shared else {}),
        **(
            {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True}}
            if args.fsdp
            else {}
        ),
        **({"deepspeed": deepspeed_config(args.zero)} if args.zero is not None else {}),
    )
    if args.unready_rank == int(os.environ.get("RANK", "0")):
        import orpo.layout_proof

        orpo.layout_proof.probe_ready = lambda model: False
    trainer = ORPOTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(toy_rows(64, seed=1)),
        eval_dataset=Dataset.from_list(toy_rows(12, seed=2)) if args.eval else None,
        processing_class=demo_tokenizer(),
        peft_config=lora_config() if args.lora else None,
    )
    # under ZeRO-3 a model loaded by path is partitioned as it loads (zero.Init): its parameters carry ids
    partitioned_at_load = hasattr(next(trainer.model.parameters()), "ds_id")
    if args.model_head:
        trainer.head.use_model_logits()
    memory_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - memory_before) / 1024
    trainer.save_model(args.out)
    final_eval = trainer.evaluate() if args.eval else {}
    if trainer.is_world_process_zero():
        history = [
            {k: v for k, v in entry.items() if isinstance(v, int | float)}
            for entry in trainer.state.log_history
        ]
        Path(args.out, "history.json").write_text(json.dumps(history, indent=1))
        Path(args.out, "eval.json").write_text(json.dumps(final_eval, indent=1))
        Path(args.out, "world_size.txt").write_text(str(int(os.environ.get("WORLD_SIZE", "1"))))
        Path(args.out, "head.txt").write_text("model" if trainer.head.plan is None else "chunked")
        Path(args.out, "layout.txt").write_text(trainer.layout.description)
        Path(args.out, "cost.json").write_text(
            json.dumps({"seconds": seconds, "peak_increase_mib": peak_mib})
        )
        engine = "fsdp2" if trainer.accelerator.is_fsdp2 else trainer.accelerator.distributed_type.value
        Path(args.out, "engine.txt").write_text(engine)
        Path(args.out, "partitioned_at_load.txt").write_text(str(partitioned_at_load))

    del trainer, model
    finish_processes()  # what `orpo train` does too: see orpo.guards


if __name__ == "__main__":
    main()
