"""A short ORPOTrainer run for the multi-process tests: launched by ``torchrun`` with 1 or N
processes, it writes the logged history and the final weights to ``--out``.

    torchrun --nproc_per_node 2 tests/distributed_run.py --out DIR --batch 2 --accum 1 --steps 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402

from conftest import make_model, toy_rows  # noqa: E402
from orpo import ORPOConfig, ORPOTrainer  # noqa: E402
from orpo.demo import demo_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, required=True, help="per-process batch size")
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=None, help="max_tokens_per_batch")
    parser.add_argument("--fsdp", action="store_true", help="FSDP full shard (FSDP2)")
    args = parser.parse_args()
    torch.set_num_threads(1)

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
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        activation_checkpointing=args.gradient_checkpointing,
        dataloader_num_workers=0,
        max_tokens_per_batch=args.max_tokens,
        **(
            {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True}}
            if args.fsdp
            else {}
        ),
    )
    trainer = ORPOTrainer(
        model=make_model(seed=3),
        args=config,
        train_dataset=Dataset.from_list(toy_rows(64, seed=1)),
        processing_class=demo_tokenizer(),
    )
    trainer.train()
    trainer.save_model(args.out)
    if trainer.is_world_process_zero():
        history = [
            {k: v for k, v in entry.items() if isinstance(v, int | float)}
            for entry in trainer.state.log_history
        ]
        Path(args.out, "history.json").write_text(json.dumps(history, indent=1))
        Path(args.out, "world_size.txt").write_text(str(int(os.environ.get("WORLD_SIZE", "1"))))
        Path(args.out, "head.txt").write_text("model" if trainer._head_plan is None else "chunked")

    # Clean shutdown (torch 2.13 + gloo): leaving teardown to interpreter exit aborts some runs, and
    # destroying the process group while the trainer still holds references hangs some; release
    # everything, then barrier, then destroy.
    del trainer
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
