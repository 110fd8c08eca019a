"""``ORPOTrainer``: a thin ``transformers.Trainer`` that wires model -> hidden states -> log-probs -> loss.

Read top to bottom: ``__init__`` resolves the model, tokenizer and datasets (:mod:`orpo.models`,
:func:`orpo.data.load_pairs`) and picks the batch layout (:func:`orpo.layout_proof.choose_layout`);
``compute_loss`` reads the batch's :class:`~orpo.scored.ScoredTokens`, runs one forward over chosen and
rejected rows together, scores only those tokens (:class:`orpo.head.HeadRunner`), and hands their log-probs
to :class:`orpo.loss.PairLoss`;
``get_batch_samples`` counts the tokens and pairs of the whole optimizer step so gradient accumulation and
data parallelism never change the objective; ``log`` turns accumulated metric sums into TRL-named means.
Every method here is a ``Trainer`` override or a short helper of one; the private ``Trainer`` methods it
relies on are listed in :mod:`orpo.private_api` (a test checks the installed transformers has them).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from functools import partial
from pathlib import Path

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments

from orpo import run_folder
from orpo.checkpoints import AtomicCheckpoints
from orpo.config import ORPOConfig, as_orpo_config, precision_description, settle_default_bf16
from orpo.cpu_heap import heap_kept
from orpo.data import load_run_pairs
from orpo.data.batching import token_budget_loader, with_pair_lengths
from orpo.data.collator import check_collator, collator_for
from orpo.data.tokenize import ROW_INDEX, TOKENIZED_COLUMNS, rows_fingerprint
from orpo.errors import OrpoError
from orpo.generation import eval_samples, publish_generations
from orpo.guards import StepHealth, require_distributed_launch
from orpo.head import HeadRunner, HeadSettings
from orpo.layout_proof import PendingLayoutCheck, agreed_layout, choose_layout, first_batch_checks
from orpo.layouts import PADDED, Layout
from orpo.loss import PairLoss, means_from_sums
from orpo.model_card import write_model_card
from orpo.models import prepare_model, resolve_tokenizer
from orpo.private_api import PRIVATE_TRAINER_API  # noqa: F401 - read here by tests and readers
from orpo.run_folder import record_prompt_format
from orpo.scored import ScoredTokens

logger = logging.getLogger("orpo")

# The metrics of the batch layout and the head, and the counts they are means over (the loss's own: orpo.loss).
PER_LAID_OUT_TOKEN = {
    "logits/chosen": "logits/chosen_tokens",
    "logits/rejected": "logits/rejected_tokens",
    "padding_fraction": "layout_tokens",  # padding tokens over all tokens the batches laid out
}

MODEL_TAGS = ["trl", "orpo"]  # TRL's tags for ORPO-trained models (orpo is a TRL drop-in)


class ORPOTrainer(AtomicCheckpoints, Trainer):
    """Odds Ratio Preference Optimization on ``transformers.Trainer``.

    Args:
        model: a causal LM, or a name/path loaded with ``AutoModelForCausalLM`` (kwargs from
            ``args.model_init_kwargs``; ``trust_remote_code`` only if set there or in ``args``).
        args: an :class:`ORPOConfig` (a plain ``TrainingArguments`` is converted).
        train_dataset / eval_dataset: ``datasets.Dataset`` (or a dict of them for eval) of
            ``prompt`` / ``chosen`` / ``rejected`` rows, strings or chat messages, or anything
            :func:`orpo.data.load_pairs` reads (paths, hub names, weighted mixes). Already tokenized
            datasets (``prompt_input_ids`` ...) are used as they are.
        tokenizer / processing_class: the tokenizer (both names accepted; TRL uses the second).
        data_collator: defaults to the collator of the chosen batch layout.
        peft_config: a ``peft`` config; the model is wrapped with ``get_peft_model``.
    """

    # compute_loss normalises by the whole optimizer step's counts itself (see get_batch_samples).
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str | None = None,
        args: ORPOConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset: Dataset | None = None,
        eval_dataset: Dataset | dict[str, Dataset] | None = None,
        processing_class=None,
        model_init=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        peft_config=None,
        compute_metrics=None,
        *,
        tokenizer=None,
    ):
        # TRL's parameters in TRL's order, so positional calls written for TRL assign the same things;
        # `tokenizer` (the name users know from older TRL) is keyword-only.
        args = as_orpo_config(args)
        require_distributed_launch(args.world_size)  # before loading or tokenizing anything
        if model is None and model_init is None:
            raise OrpoError("ORPOTrainer needs a model (a model object or a name/path)")
        tokenizer = resolve_tokenizer(tokenizer, processing_class, model, args)
        model = prepare_model(model, args, peft_config)
        settle_default_bf16(args, model)  # before Trainer builds the accelerator from args.mixed_precision
        self._pad_id = tokenizer.pad_token_id if args.padding_value is None else args.padding_value
        train_dataset, eval_dataset, self.tokenize_reports = load_run_pairs(
            train_dataset, eval_dataset, tokenizer, args
        )
        self._metric_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._health = StepHealth(args.nan_policy, args.world_size, args.divergence_factor)
        self._eval_prefix = "eval"
        try:
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator or collator_for(PADDED, self._pad_id, args.nll_include_prompt),
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=tokenizer,
                model_init=model_init,
                compute_metrics=compute_metrics,
                callbacks=callbacks,
                optimizers=optimizers,
                preprocess_logits_for_metrics=preprocess_logits_for_metrics,
            )
        except OrpoError:
            raise
        except ValueError as err:  # Trainer's own checks of the settings (e.g. evaluation, no eval data)
            raise OrpoError(f"invalid training settings: {err}") from err
        self._set_up_batches_and_head(data_collator)
        vocab = getattr(getattr(self.model, "config", None), "vocab_size", None)
        if vocab:  # the divergence check's floor: the loss of a uniform guess over the vocabulary
            self._health.divergence.floor = math.log(vocab) + args.orpo_alpha * math.log(2)

    @property
    def tokenizer(self):
        """The tokenizer under the name scripts for TRL ≤ 0.11 and transformers 4 read (``processing_class`` now)."""
        return self.processing_class

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """Trainer's ``train`` inside the run folder's rules (:mod:`orpo.run_folder`): the folder locked for this
        run, an earlier run there started over (its checkpoints removed, with a warning), a resume from the
        newest complete checkpoint (``resume_from_checkpoint=True``) with the settings it was started with."""
        # Again here: any TrainingArguments built since __init__ reset accelerate's shared state.
        require_distributed_launch(self.args.world_size)
        out = Path(self.args.output_dir)
        took_lock, resume_from_checkpoint = run_folder.enter(
            out,
            self.args,
            resume_from_checkpoint,
            first=self.is_world_process_zero(),
            data_fingerprint=rows_fingerprint(self.train_dataset),
        )
        try:
            with heap_kept(active=self.args.device.type == "cpu"):
                result = super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            if took_lock:
                run_folder.release(out)
        if (problem := self._health.losses.too_many_skipped()) is not None:
            raise OrpoError(problem)
        return result

    # ---- construction helpers -----------------------------------------------------------------

    def _set_up_batches_and_head(self, data_collator) -> None:
        """After Trainer's own set-up: the head runner, and the batch layout with its collator (a collator
        passed in is checked instead); the model tagged as TRL tags its ORPO models."""
        if data_collator is not None and (row := self._probe_row()) is not None:
            check_collator(data_collator, row)
        if hasattr(self.model, "add_model_tags"):  # on the hub's model card
            self.model.add_model_tags(MODEL_TAGS)
        self.head = HeadRunner(self.accelerator, HeadSettings.for_trainer(self))
        if self.model is not None:  # hooked before anything can compile the model (torch_compile)
            self.head.register(self.accelerator.unwrap_model(self.model))
        self.layout: Layout | None = None  # the batch layout, when the trainer chooses the collator
        self._pending_layout_check: PendingLayoutCheck | None = None  # for the first batch
        if data_collator is None:
            self._choose_layout()
            self.data_collator = collator_for(self.layout, self._pad_id, self.args.nll_include_prompt)
            logger.info(f"batch layout: {self.layout.description}")
        logger.info(f"precision: {precision_description(self.args)}")

    @property
    def _fsdp(self) -> bool:
        return bool(getattr(self, "is_fsdp_enabled", False))

    def _engine_prepares_model(self) -> bool:
        """FSDP, DeepSpeed ZeRO-3 or model parallel: the model runs whole only once prepared."""
        return not self.place_model_on_device or self.head.settings.zero3 or self._fsdp

    def _choose_layout(self) -> None:
        """The batch layout (:func:`orpo.layout_proof.choose_layout`), checked on the first data row; under an
        engine (FSDP, DeepSpeed, model parallel) on the model's first layers, again at the first batch."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        choice = choose_layout(
            unwrapped,
            self._probe_row(),
            padding_free=self.args.padding_free,
            prefix_sharing=self.args.prefix_sharing,
            engine=self._engine_prepares_model(),
            low_precision=self.head.settings.low_precision,
            agree=partial(agreed_layout, accelerator=self.accelerator),
        )
        self.layout, self._pending_layout_check = choice.layout, choice.pending

    def _probe_row(self) -> dict | None:
        """The first tokenized pair of the training (else evaluation) data, for the layout check."""
        for dataset in (self.train_dataset, self.eval_dataset):
            if isinstance(dataset, dict):
                dataset = next(iter(dataset.values()), None)
            if isinstance(dataset, Dataset) and len(dataset):
                return dataset[0]
        return None

    # ---- data: samplers, loaders, token counts --------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        """Trainer's sampler; for ``train_sampling_strategy: group_by_length`` / ``batch_rebalance`` it needs
        per-row lengths, which Trainer would look for under ``input_ids``: give it the pair's tokens
        (prompt + chosen + rejected) as the length column."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(self.args, "train_sampling_strategy", "random") in ("group_by_length", "batch_rebalance"):
            dataset = with_pair_lengths(dataset, self.args.length_column_name)
        return super()._get_train_sampler(dataset)

    def get_train_dataloader(self):
        """Trainer's loader, or with ``max_tokens_per_batch`` one whose batches fill a token budget
        (:func:`orpo.data.batching.token_budget_loader`)."""
        if self.args.max_tokens_per_batch is None or self.train_dataset is None:
            return super().get_train_dataloader()
        dataset = self._remove_unused_columns(self.train_dataset, description="Training")
        return token_budget_loader(
            dataset, self.data_collator, self.layout or PADDED, self.args, self.accelerator
        )

    def _track_num_input_tokens(self, inputs):
        """``include_num_input_tokens_seen: non_padding`` from the collator's own count of the tokens it
        laid out that are not padding (a shared prompt counts once): Trainer's own count compares ids
        with the pad id, which misses every real EOS when the pad token is the EOS token (common)."""
        if self.args.include_num_input_tokens_seen == "non_padding" and "num_tokens" in inputs:
            tokens = torch.as_tensor(inputs["num_tokens"], device=self.args.device, dtype=torch.int64)
            self.state.num_input_tokens_seen += self.accelerator.gather(tokens).sum().item()
            return
        super()._track_num_input_tokens(inputs)

    def _set_signature_columns_if_needed(self):
        # The collator needs the tokenized columns, not the model's forward arguments, so even with
        # remove_unused_columns=True nothing it needs is dropped.
        if self._signature_columns is None:
            self._signature_columns = [*TOKENIZED_COLUMNS, ROW_INDEX]

    # ---- forward: hidden states -> log-probs of the scored tokens --------------------------------

    def _first_batch_checks(self, model, inputs) -> None:
        """Once, on the prepared model (:func:`orpo.layout_proof.first_batch_checks`): a layout chosen before an
        engine prepared it, and the LM head."""
        if not self.head.resolved:
            pending = self._pending_layout_check
            first_batch_checks(model, self.head, inputs, pending, self._probe_row() if pending else None)
            self._pending_layout_check = None

    def scored_logprobs(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logps [N], mean_logits [N])`` of the batch's scored tokens (:class:`orpo.scored.ScoredTokens`)."""
        self._first_batch_checks(model, inputs)
        return self.head.logprobs(model, inputs, ScoredTokens.from_batch(inputs))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Trainer's save, without a second copy of a tied weight: the state dict an engine gathers
        (DeepSpeed ZeRO-2 clones every tensor) lists it under both names, and transformers only drops
        names that share storage. ``from_pretrained`` ties it again."""
        if state_dict is not None:
            tied = getattr(self.accelerator.unwrap_model(self.model), "all_tied_weights_keys", None) or {}
            state_dict = {
                name: tensor
                for name, tensor in state_dict.items()
                if not (
                    name in tied and tied[name] in state_dict and torch.equal(tensor, state_dict[tied[name]])
                )
            }
        super()._save(output_dir, state_dict)
        trained = self.tokenize_reports.get("train_dataset")
        if trained is not None and trained.chat_template is not None:
            record_prompt_format(output_dir or self.args.output_dir, trained.chat_template)
        write_model_card(self, output_dir)  # beside every model and checkpoint, as TRL's trainers do

    def create_model_card(self, model_name=None, dataset_name=None, tags=None, **kwargs):
        """``push_to_hub``'s card, taking TRL's arguments (``model_name``, ``dataset_name``, ``tags``) and
        transformers' (``language``, ``license``, ``finetuned_from``, ``dataset``, ...):
        :func:`orpo.model_card.write_model_card`."""
        write_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags, **kwargs)

    # ---- loss and its normalisation over the optimizer step ----------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step and attach to each the step's total NLL
        token and pair counts (summed over processes), the loss normalisers."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        per_batch = [ScoredTokens.step_counts(b) for b in batch_samples]
        counts = torch.stack(per_batch).sum(0).to(device=device, dtype=torch.float32)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(counts).reshape(-1, 2).sum(0)
        batch_samples = [
            dict(batch, step_nll_tokens=counts[0], step_pairs=counts[1]) for batch in batch_samples
        ]
        return batch_samples, counts[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._first_batch_checks(model, inputs)
        scored = ScoredTokens.from_batch(inputs)
        # Normalised by the whole step's counts in training; a lone micro-batch (evaluation) by its own.
        pair_loss = PairLoss.for_batch(
            scored,
            self.args.orpo_alpha,
            self.args.orpo_beta,
            inputs.get("step_nll_tokens"),
            inputs.get("step_pairs"),
        )
        fused = self.head.fused_loss(model, inputs, scored, pair_loss)
        if fused is not None:
            loss, logps, mean_logits = fused
            _, stats = pair_loss(logps, scored)  # the metrics; cheap, no head
        else:
            logps, mean_logits = self.head.logprobs(model, inputs, scored)
            loss, stats = pair_loss(logps, scored)
        skipped = False
        if model.training:
            loss, skipped = self._health.losses.check(loss, inputs.get(ROW_INDEX), self.state.global_step + 1)
        if "step_pairs" in inputs and self.accelerator.num_processes > 1:
            # Normalised by global counts, but DDP averages gradients over processes: undo that.
            loss = loss * self.accelerator.num_processes
        if not skipped:
            self._record_metrics("train" if model.training else "eval", stats, mean_logits, scored, inputs)
        if return_outputs:
            return loss, {
                "chosen_logps": stats.chosen_logps,
                "rejected_logps": stats.rejected_logps,
                "mean_logits": mean_logits,
            }
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        """Trainer computes the gradient norm right before the optimizer step: there the step's health is checked
        (:class:`orpo.guards.StepHealth`), and a bad step stops with the weights from before it saved."""
        step = self.state.global_step + 1
        if (stop := self._health.before_update(self.accelerator, step)) is not None:
            self._stop_before_step(model, *stop)
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if (stop := self._health.gradient_problem(grad_norm, step)) is not None:
            self._stop_before_step(model, *stop)
        return grad_norm

    def _stop_before_step(self, model, problem: str, advice: str) -> None:
        """Checkpoint the last good state (the weights before this step: the optimizer has not run) and stop
        with ``problem``, where it was saved, and ``advice``."""
        self._save_checkpoint(model, trial=None)
        raise OrpoError(
            f"{problem}; the weights before this step are saved in "
            f"{self.args.output_dir}/checkpoint-{self.state.global_step}" + (f". {advice}" if advice else "")
        )

    # ---- metrics and evaluation ---------------------------------------------------------------------

    def _record_metrics(self, mode, stats, mean_logits, scored: ScoredTokens, inputs) -> None:
        sums = self._metric_sums[mode]
        for name, value in stats.metric_sums().items():
            sums[name] += value
        for side, selected in (
            ("chosen", scored.chosen & scored.response),
            ("rejected", ~scored.chosen & scored.response),
        ):
            sums[f"logits/{side}"] += mean_logits[selected].sum()
            sums[f"logits/{side}_tokens"] += selected.sum().float()
        if "num_tokens" in inputs:  # collators of this package count their real tokens
            laid_out = inputs["input_ids"].numel()
            sums["padding_fraction"] += laid_out - inputs["num_tokens"].float()
            sums["layout_tokens"] += laid_out

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """As TRL's: ``(loss, logits, labels)`` with ``logits = [logits/chosen, logits/rejected]`` of the batch
        (the mean logit over chosen and over rejected response tokens) and ``labels`` two zeros, so a
        ``compute_metrics`` written for TRL's ORPOTrainer gets the same arrays."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        scored = ScoredTokens.from_batch(inputs)
        response, chosen = scored.response, scored.chosen
        mean_logits = outputs["mean_logits"].detach()
        logits = torch.stack([mean_logits[response & chosen].mean(), mean_logits[response & ~chosen].mean()])
        return loss.detach(), logits, torch.zeros(2, device=logits.device)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._eval_prefix = metric_key_prefix
        self._metric_sums["eval"].clear()
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self.args.generate_during_eval:
            self._log_eval_generations(eval_dataset, metric_key_prefix)
        return metrics

    def _log_eval_generations(self, eval_dataset, prefix: str) -> None:
        """``generate_during_eval`` (:func:`orpo.generation.eval_samples`). Every process generates (a
        sharded model needs all of them in each forward); the first one logs."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        if not isinstance(dataset, Dataset) or not len(dataset):
            return  # several named sets: evaluate() comes back here for each of them
        model = self.accelerator.unwrap_model(self.model)
        rows = eval_samples(
            model, dataset, self.processing_class, self.args, self._pad_id, self.accelerator.autocast
        )
        if self.is_world_process_zero():
            logged = [{"step": self.state.global_step, "dataset": prefix, **row} for row in rows]
            table = "game_log" if prefix == "eval" else f"{prefix}_game_log"
            publish_generations(logged, self.args.output_dir, self.args.report_to, table)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the accumulated ORPO metrics (means over all pairs / tokens since the last log,
        over all processes) under TRL's names, ``eval_``-prefixed in evaluation."""
        mode = "eval" if any(key.startswith(f"{self._eval_prefix}_") for key in logs) else "train"
        sums = self._metric_sums[mode]
        if sums:
            names = sorted(sums)
            values = torch.stack(
                [torch.as_tensor(sums[n], dtype=torch.float32, device=self.args.device) for n in names]
            )
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(values, reduction="sum")
            prefix = f"{self._eval_prefix}_" if mode == "eval" else ""
            sums_here = dict(zip(names, values.cpu(), strict=True))
            for name, mean in means_from_sums(sums_here, per=PER_LAID_OUT_TOKEN).items():
                logs[prefix + name] = mean
            sums.clear()
        if mode == "train" and self._health.losses.skipped:
            logs["nan_skipped_batches"] = self._health.losses.skipped  # since the start of training
        super().log(logs, start_time)
