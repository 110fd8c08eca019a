"""``ORPOTrainer``: a thin ``transformers.Trainer`` that wires model -> hidden states -> log-probs -> loss.

Read top to bottom: ``__init__`` resolves the model, tokenizer and datasets; ``compute_loss``
runs one forward over chosen and rejected rows together, scores only the positions the loss
needs (:mod:`orpo.logprobs`), and hands the flat log-probs to :func:`orpo.loss.orpo_loss`;
``get_batch_samples`` counts the tokens and pairs of the whole optimizer step so gradient
accumulation and data parallelism never change the objective; ``log`` turns accumulated metric
sums into TRL-named means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections import defaultdict
from functools import partial

import torch
from datasets import Dataset, DatasetDict
from torch import nn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, Trainer, TrainingArguments, set_seed
from transformers.trainer_utils import seed_worker

from orpo.batching import TokenBudgetBatchSampler, pair_lengths
from orpo.checkpoints import AtomicCheckpoints
from orpo.config import ORPOConfig
from orpo.data import (
    ROW_INDEX,
    TOKENIZED_COLUMNS,
    TruncationLimits,
    default_cache_dir,
    split_off_eval,
    tokenize_dataset,
)
from orpo.errors import OrpoError
from orpo.formats import load_preference_data
from orpo.generation import complete, publish_generations, sample_indices
from orpo.guards import require_distributed_launch
from orpo.head import HeadInputCapture, HeadPlan, forward_replaced, head_plan_for
from orpo.layouts import (
    PADDED,
    Layout,
    candidate_layouts,
    check_mode,
    first_layers,
    layout_error,
    model_inputs,
    probe_ready,
    tolerance,
    unsupported_reason,
    whole_parameters,
)
from orpo.logprobs import (
    chunk_size_for,
    chunked_target_logprobs,
    full_target_logprobs,
    fused_linear_loss,
    segment_chunks,
)
from orpo.loss import means_from_sums, orpo_loss
from orpo.models import check_decoder_only, disable_dropout, is_quantized, load_causal_lm, load_tokenizer

logger = logging.getLogger("orpo")

# The largest chunk (in chunk sizes) the fused head+loss takes for a single pair; beyond it, the
# unfused head keeps memory at one chunk.
_FUSED_MAX_CHUNKS = 4

# How many tokens of the first batch's first row the one-off head self-check compares.
_HEAD_CHECK_TOKENS = 64


def _num_pairs(inputs: dict) -> int:
    """Pairs in a batch: from the collator's host-side ``pair_sizes`` (no device sync), else the tensor."""
    return len(inputs["pair_sizes"]) if "pair_sizes" in inputs else int(inputs["num_pairs"])


def _first_sequence(inputs: dict, max_tokens: int) -> dict:
    """The first sequence of a batch (at most ``max_tokens``), unpadded, as model inputs."""
    if "segment_ids" in inputs:  # shared prefix: the prompt and chosen tokens of the first row
        length = int((inputs["segment_ids"][0] >= 0).logical_and(inputs["segment_ids"][0] <= 1).sum())
    elif "position_ids" in inputs:
        restarts = (inputs["position_ids"][0, 1:] == 0).nonzero()
        length = int(restarts[0]) + 1 if len(restarts) else inputs["input_ids"].shape[1]
    else:
        length = int(inputs["attention_mask"][0].sum())
    ids = inputs["input_ids"][:1, : min(length, max_tokens)]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def attention_backends(device: torch.device):
    """On CUDA, sdpa without its cuDNN backend: cuDNN plans each new shape on the host (~2.5 ms per
    attention call on an H200, measured), and batch shapes change every step, so a 0.5B model spent
    a third of its host time there while the GPU waited; flash / memory-efficient kernels take the
    same inputs. Elsewhere, no change."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class ORPOTrainer(AtomicCheckpoints, Trainer):
    """Odds Ratio Preference Optimization on ``transformers.Trainer``.

    Args:
        model: a causal LM, or a name/path loaded with ``AutoModelForCausalLM`` (kwargs from
            ``args.model_init_kwargs``; ``trust_remote_code`` only if set there or in ``args``).
        args: an :class:`ORPOConfig` (a plain ``TrainingArguments`` is converted).
        train_dataset / eval_dataset: ``datasets.Dataset`` (or a dict of them for eval) of
            ``prompt`` / ``chosen`` / ``rejected`` rows, strings or chat messages. Already
            tokenized datasets (``prompt_input_ids`` ...) are used as they are.
        tokenizer / processing_class: the tokenizer (both names accepted; TRL uses the second).
        data_collator: defaults to :class:`orpo.collator.PaddedPairCollator`.
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
        tokenizer=None,
        processing_class=None,
        model_init=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        preprocess_logits_for_metrics=None,
        peft_config=None,
    ):
        args = self._resolve_args(args)
        require_distributed_launch(args.world_size)  # before loading or tokenizing anything
        if model is None and model_init is None:
            raise OrpoError("ORPOTrainer needs a model (a model object or a name/path)")
        tokenizer = self._resolve_tokenizer(tokenizer, processing_class, model, args.trust_remote_code)
        if isinstance(model, str):
            model = load_causal_lm(model, args.model_init_kwargs)
        check_decoder_only(model)
        if peft_config is not None:
            model = self._wrap_peft(model, peft_config, args)
        elif is_quantized(model) and not hasattr(model, "peft_config"):
            raise OrpoError(
                "the model is loaded in 4-bit or 8-bit, whose weights cannot be trained directly: train an "
                "adapter on it (QLoRA) with peft_config= or a 'peft:' block in the config"
            )
        if model is not None and args.disable_dropout:
            disable_dropout(model)
        if tokenizer.pad_token_id is None and args.padding_value is None:
            logger.warning("the tokenizer has no pad token; using its eos token for padding")
            tokenizer.pad_token = tokenizer.eos_token
        pad_id = self._pad_id = tokenizer.pad_token_id if args.padding_value is None else args.padding_value

        limits = TruncationLimits(args.max_length, args.max_prompt_length, args.max_completion_length)
        self.tokenize_reports = {}
        with args.main_process_first(desc="tokenizing datasets"):
            train_dataset = self._prepare_dataset(train_dataset, tokenizer, limits, args, "train_dataset")
            if isinstance(eval_dataset, dict | DatasetDict):
                eval_dataset = {
                    name: self._prepare_dataset(ds, tokenizer, limits, args, f"eval_dataset[{name}]")
                    for name, ds in eval_dataset.items()
                }
            else:
                eval_dataset = self._prepare_dataset(eval_dataset, tokenizer, limits, args, "eval_dataset")
        if args.val_set_size and train_dataset is not None:
            if eval_dataset is not None:
                raise OrpoError("give val_set_size or an eval_dataset, not both")
            total = len(train_dataset)
            train_dataset, eval_dataset = split_off_eval(train_dataset, args.val_set_size, args.seed)
            logger.warning(
                f"val_set_size {args.val_set_size:g}: {len(eval_dataset)} of {total} training pairs held out "
                f"for evaluation (seed {args.seed})"
            )

        self.layout: Layout | None = None  # the batch layout, when the trainer chooses the collator
        self._layout_unverified = False
        self._metric_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._nan_skipped = 0
        self._step_losses: list = []  # (loss, dataset rows) of this optimizer step's micro-batches
        if args.nan_policy == "skip" and args.world_size > 1:
            raise OrpoError(
                "nan_policy 'skip' works in single-process training only; use 'error' with several processes"
            )
        self._head_plan: HeadPlan | None | str = "unresolved"
        self._eval_prefix = "eval"

        try:
            super().__init__(
                model=model,
                args=args,
                data_collator=data_collator or PADDED.collator(pad_id, args.nll_include_prompt),
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
        self._register_head_capture()  # before anything can compile the model (torch_compile)
        if data_collator is None:
            self.layout = self._choose_layout()
            self.data_collator = self.layout.collator(pad_id, args.nll_include_prompt)
            logger.info(f"batch layout: {self.layout.description}")

    def train(self, *args, **kwargs):
        # Again here: any TrainingArguments built since __init__ reset accelerate's shared state.
        require_distributed_launch(self.args.world_size)
        return super().train(*args, **kwargs)

    # ---- construction helpers -----------------------------------------------------------------

    @staticmethod
    def _resolve_args(args) -> ORPOConfig:
        if args is None:
            return ORPOConfig(output_dir="orpo-output")
        if isinstance(args, ORPOConfig):
            return args
        if isinstance(args, TrainingArguments):
            values = {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.init}
            for key in ("gradient_checkpointing", "gradient_checkpointing_kwargs"):
                values.pop(key, None)  # mirrors of activation_checkpointing*, resolved again
            return ORPOConfig(**values)
        raise OrpoError(f"args must be an ORPOConfig or TrainingArguments, got {type(args).__name__}")

    @staticmethod
    def _resolve_tokenizer(tokenizer, processing_class, model, trust_remote_code: bool = False):
        if tokenizer is not None and processing_class is not None and tokenizer is not processing_class:
            raise OrpoError(
                "pass the tokenizer as `tokenizer=` or `processing_class=`, not two different ones"
            )
        tokenizer = tokenizer if tokenizer is not None else processing_class
        if tokenizer is None:
            if not isinstance(model, str):
                raise OrpoError("ORPOTrainer needs a tokenizer (`tokenizer=` or `processing_class=`)")
            tokenizer = load_tokenizer(model, trust_remote_code)
        return tokenizer

    @staticmethod
    def _wrap_peft(model, peft_config, args: ORPOConfig):
        """``get_peft_model``; a 4-/8-bit model is first prepared for adapter training (QLoRA): norms in
        fp32, input gradients on for activation checkpointing. The adapter's initial weights are drawn
        from ``args.seed``, so they do not depend on how the base was loaded (e.g. ZeRO-3's partitioned
        loading draws random numbers of its own)."""
        try:
            from peft import get_peft_model, prepare_model_for_kbit_training
        except ImportError as err:
            raise OrpoError(
                "peft_config was given but peft is not installed: pip install 'orpo[peft]'"
            ) from err
        if is_quantized(model):
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=bool(args.activation_checkpointing),
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        set_seed(args.seed)
        return get_peft_model(model, peft_config)

    def _prepare_dataset(self, dataset, tokenizer, limits, args, name):
        """Load (a path or hub name), normalise the format, tokenize and truncate one dataset."""
        if dataset is None:
            return None
        if isinstance(dataset, Dataset) and all(
            column in dataset.column_names for column in TOKENIZED_COLUMNS
        ):
            return dataset.select_columns(list(TOKENIZED_COLUMNS))
        normalized, _, source_name = load_preference_data(
            dataset,
            fmt=args.dataset_format,
            columns=args.dataset_columns,
            skip_invalid=args.skip_invalid_rows,
            split="train" if name == "train_dataset" else "test",
            seed=args.seed,
            subset=args.dataset_subset,
        )
        source_name = name if source_name == "dataset" else source_name
        tokenized, report = tokenize_dataset(
            normalized,
            tokenizer,
            limits,
            source=source_name,
            num_proc=args.dataset_num_proc,
            cache_dir=default_cache_dir(),
        )
        self.tokenize_reports[name] = report
        return tokenized

    def _get_train_sampler(self, train_dataset=None):
        """Trainer's sampler; for ``train_sampling_strategy: group_by_length`` / ``batch_rebalance`` it needs
        per-row lengths, which Trainer would look for under ``input_ids``: give it the pair's tokens
        (prompt + chosen + rejected) as the length column."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        column = self.args.length_column_name
        if (
            getattr(self.args, "train_sampling_strategy", "random") in ("group_by_length", "batch_rebalance")
            and isinstance(dataset, Dataset)
            and column not in dataset.column_names
        ):
            dataset = dataset.add_column(column, [sum(pair) for pair in pair_lengths(dataset)])
        return super()._get_train_sampler(dataset)

    def get_train_dataloader(self):
        """Trainer's loader, or with ``max_tokens_per_batch`` one whose batches fill a token budget (see
        :mod:`orpo.batching`); that sampler is already split across processes, so accelerate's own
        per-process split is turned into a pass-through."""
        budget = self.args.max_tokens_per_batch
        if budget is None or self.train_dataset is None:
            return super().get_train_dataloader()
        sampler = TokenBudgetBatchSampler(
            pair_lengths(self.train_dataset),
            budget,
            (self.layout or PADDED).batch_tokens,
            seed=self.args.seed,
            num_processes=self.accelerator.num_processes,
            process_index=self.accelerator.process_index,
            row_index=self.train_dataset[ROW_INDEX] if ROW_INDEX in self.train_dataset.column_names else None,
        )
        loader = DataLoader(
            self._remove_unused_columns(self.train_dataset, description="Training"),
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
            persistent_workers=self.args.dataloader_persistent_workers,
            worker_init_fn=partial(
                seed_worker, num_workers=self.args.dataloader_num_workers, rank=self.args.process_index
            ),
        )
        loader = self.accelerator.prepare(loader)
        shard = getattr(loader, "batch_sampler", None)
        if shard is not sampler and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes, shard.process_index = 1, 0
        return loader

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

    def _model_config(self, model):
        """The config of the model under any wrapper, found once per model: accelerate's
        ``unwrap_model`` looks up installed packages on every call (~2.5 ms, as long as a tiny model's
        forward), which per micro-batch would be host time a GPU waits for."""
        cached = getattr(self, "_config_of", None)
        if cached is None or cached[0] is not model:
            cached = self._config_of = (model, self.accelerator.unwrap_model(model).config)
        return cached[1]

    def _forward_kwargs(self, model, inputs) -> dict:
        config = self._model_config(model)
        try:
            return model_inputs(inputs, config, next(model.parameters()).dtype)
        except ValueError as err:
            raise OrpoError(f"{err}; set prefix_sharing: false or attn_implementation: sdpa") from err

    # ---- batch layout: the fastest one the model runs exactly ---------------------------------------

    def _probe_row(self) -> dict | None:
        """The first tokenized pair of the training (else evaluation) data, for the layout check."""
        for dataset in (self.train_dataset, self.eval_dataset):
            if isinstance(dataset, dict):
                dataset = next(iter(dataset.values()), None)
            if isinstance(dataset, Dataset) and len(dataset):
                return dataset[0]
        return None

    def _low_precision(self, model) -> bool:
        return bool(self.args.bf16 or self.args.fp16 or next(model.parameters()).dtype != torch.float32)

    def _choose_layout(self) -> Layout:
        """The first of the candidate layouts (``padding_free`` / ``prefix_sharing``: True, False or None
        = auto; fastest first) that the attention backend supports and the model honours exactly,
        checked on the first data row. An auto choice that fails falls back to the next one with a
        warning; a layout asked for that fails is an error.

        A model an engine prepares later (FSDP, DeepSpeed, model parallel) is checked here on its first
        decoder layers, where it is (usually the CPU; ZeRO-3 partitions gathered); all processes then
        take the most conservative of their choices, and the whole prepared model is checked again on
        the first batch, where a failure can only be an error. A model not at hand here (meta
        parameters), or no data row yet: only layouts asked for explicitly, checked on the first batch;
        auto means padded rows."""
        unwrapped = self.accelerator.unwrap_model(self.model)
        config = unwrapped.config
        row = self._probe_row()
        engine = not self.place_model_on_device or self._parameters_sharded()
        explicit = candidate_layouts(bool(self.args.padding_free), bool(self.args.prefix_sharing))
        layout = None
        if row is not None and (not engine or probe_ready(unwrapped)):
            candidates = candidate_layouts(self.args.padding_free, self.args.prefix_sharing)
            if not engine:
                return self._first_exact_layout(unwrapped, config, candidates, row)
            try:
                with first_layers(unwrapped), whole_parameters(unwrapped):
                    layout = self._first_exact_layout(unwrapped, config, candidates, row)
            except OrpoError:
                raise
            except (RuntimeError, ValueError, TypeError, IndexError) as err:  # a model the cut breaks
                logger.info(f"batch layout: not checked before the engine prepares the model ({err})")
        if layout is None:
            layout = self._first_exact_layout(unwrapped, config, explicit, None)
        if engine:
            layout = self._agreed_layout(layout)
        self._layout_unverified = layout != PADDED and (engine or row is None)
        return layout

    def _first_exact_layout(self, model, config, candidates: list[Layout], row: dict | None) -> Layout:
        """The first candidate the backend supports and, given a data ``row``, the model keeps exact."""
        for index, layout in enumerate(candidates):
            last = index == len(candidates) - 1
            reason = unsupported_reason(layout, config)
            if reason is not None:
                if last:
                    option = "prefix_sharing" if layout.shared else "padding_free"
                    raise OrpoError(f"{reason}; set {option}: false or attn_implementation: sdpa")
                continue
            if layout == PADDED or row is None:
                return layout
            error = layout_error(model, config, layout, row)
            if error <= tolerance(self._low_precision(model)):
                return layout
            problem = self._leak_message(config, layout, error)
            if last:
                raise OrpoError(problem)
            warnings.warn(f"{problem}; trying the next layout", stacklevel=4)
        raise AssertionError("unreachable: the last candidate either returns or raises")

    def _agreed_layout(self, layout: Layout) -> Layout:
        """One layout for all processes (their collators and token budgets must match): the latest in
        the fastest-first order of any process's choice, e.g. padded rows where one process could not
        check its model."""
        if self.accelerator.num_processes == 1:
            return layout
        order = candidate_layouts(None, None)
        index = torch.tensor([order.index(layout)], device=self.accelerator.device)
        return order[int(self.accelerator.gather(index).max())]

    @staticmethod
    def _leak_message(config, layout: Layout, error: float) -> str:
        leak = (
            "rejected tokens see chosen ones or pairs see each other"
            if layout.shared
            else ("packed sequences attend to each other")
        )
        return (
            f"{layout.options}: {config.model_type} with attn_implementation="
            f"{getattr(config, '_attn_implementation', None)!r} does not keep this layout exact ({leak}; "
            f"max |Δ log p| = {error:.3g} against the sequences alone)"
        )

    def _first_batch_checks(self, model, inputs) -> None:
        if self._head_plan != "unresolved":
            return
        self._register_head_capture()
        row = self._probe_row()
        if self._layout_unverified and row is not None:
            # checked on the whole model now that the engine has prepared it
            config = self._model_config(model)
            error = layout_error(model, config, self.layout, row)
            if not error <= tolerance(self._low_precision(model)):
                raise OrpoError(
                    self._leak_message(config, self.layout, error)
                    + "; set padding_free: false and prefix_sharing: false"
                )
            self._layout_unverified = False
        self._head_plan = self._resolve_head(model, inputs)

    def _register_head_capture(self) -> None:
        if self.model is not None:
            unwrapped = self.accelerator.unwrap_model(self.model)
            if hasattr(unwrapped, "get_output_embeddings"):
                self._head_capture(unwrapped.get_output_embeddings())

    def _resolve_head(self, model, inputs) -> HeadPlan | None:
        """Find the separable head once, and check it against the model's own logits on a few
        tokens of the first batch; any mismatch falls back to full logits with a warning."""
        if self._head_weight_partitioned():
            # the model's own head is exact, at full-logits memory
            logger.info(
                "FSDP1 shards the LM head's weight outside its forward: computing it inside the model"
            )
            return None
        unwrapped = self.accelerator.unwrap_model(model)
        plan = head_plan_for(unwrapped)
        if plan is None:
            warnings.warn(
                "the model's LM head is not a plain nn.Linear (quantized, adapter-wrapped or custom): "
                "computing full logits, which costs batch x seq x vocab memory",
                stacklevel=2,
            )
            return None
        check = _first_sequence(inputs, _HEAD_CHECK_TOKENS)
        length = check["input_ids"].shape[1]
        if length < 2:
            return plan
        targets = check["input_ids"][0, 1:]
        positions = torch.arange(length - 1, device=targets.device)
        with check_mode(model):
            reference, _ = full_target_logprobs(model(**check, use_cache=False).logits[0, :-1], targets)
            try:
                ours, _ = self._chunked_logprobs(model, plan, check, positions, targets)
            except RuntimeError as err:  # e.g. a head weight an engine left sharded after the forward
                warnings.warn(
                    f"the LM head cannot be computed outside the model ({err}); computing full logits",
                    stacklevel=2,
                )
                return None
        # bf16/fp16 logits (a half-precision head, or autocast) differ from an fp32 reference by
        # rounding alone; an unknown logit transform differs by far more.
        low_precision = plan.head.weight.dtype != torch.float32 or self.args.bf16 or self.args.fp16
        tolerance = 5e-2 if low_precision else 1e-3
        error = (reference - ours).abs().max().item()
        if not error <= tolerance:
            warnings.warn(
                f"the separated LM head disagrees with the model's own logits (max |Δ log p| = {error:.3g}); "
                "this architecture transforms logits in a way orpo does not know, so full logits are used",
                stacklevel=2,
            )
            return None
        return plan

    def _parameters_sharded(self) -> bool:
        """FSDP or DeepSpeed ZeRO-3: the engine shards parameters, and the model only runs once prepared."""
        if getattr(self, "is_fsdp_enabled", False):
            return True
        return self._zero3()

    def _zero3(self) -> bool:
        plugin = (
            getattr(self.accelerator.state, "deepspeed_plugin", None) if self.is_deepspeed_enabled else None
        )
        return plugin is not None and plugin.zero_stage == 3

    def _head_weight_partitioned(self) -> bool:
        """Whether the LM head's weight is only a shard once the model's forward has returned, with no
        way for our head to gather it: FSDP1 (flat parameters). FSDP2 as accelerate applies it keeps the
        last unit (final norm and LM head) unsharded from the forward to the backward, so the chunked
        head sees the whole weight (an FSDP2 head resharded after its forward leaves a DTensor shard,
        which the first-batch check catches, falling back to the model's logits); ZeRO-3 gathers it
        (:meth:`_run_head`). Tests for both: 2 processes == 1 process."""
        return getattr(self, "is_fsdp_enabled", False) and not getattr(self.accelerator, "is_fsdp2", False)

    def _head_hidden(self, model, plan: HeadPlan, inputs, positions) -> torch.Tensor:
        """Run the model body; the final hidden states ``[N, H]`` at the scored positions."""
        capture = self._head_capture(plan.head)
        with capture.capturing(), attention_backends(inputs["input_ids"].device):
            model(**self._forward_kwargs(model, inputs), use_cache=False)
        hidden = capture.take()
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)

    def _head_capture(self, head: nn.Module | None) -> HeadInputCapture | None:
        """The head's one :class:`HeadInputCapture`, registered on first use; the trainer registers it
        at construction and before the first batch, ahead of any compiled call of the model."""
        if not isinstance(head, nn.Linear):
            return None
        capture = getattr(self, "_capture", None)
        if capture is None or capture.head is not head:
            if capture is not None:
                capture.handle.remove()
            capture = self._capture = HeadInputCapture(head)
        return capture

    def _run_head(self, plan: HeadPlan, hidden: torch.Tensor, compute):
        """``compute(hidden, weight, bias)`` with the head's operands in the dtype the model's own head
        would compute in (and the head's logit scale applied).

        Under ZeRO-3 a parameter is whole only during the forward and backward of the module that owns
        it, so ``compute`` then runs as a call of the head module: DeepSpeed's own hooks gather the
        weight for it, again when gradients reach its outputs, and hold it until the weight's gradient
        is accumulated and reduced (as for any module; a gather of our own would end too early)."""

        def forward(hidden):
            weight, bias = plan.head.weight, plan.head.bias
            with self.accelerator.autocast():  # mixed precision autocasts the model's forward, not our code
                if torch.is_autocast_enabled(hidden.device.type):
                    # The model's own head would run in the autocast dtype; so does ours (and its backward).
                    dtype = torch.get_autocast_dtype(hidden.device.type)
                    weight = weight.to(dtype)
                    bias = bias.to(dtype) if bias is not None else None
            hidden = hidden.to(weight.dtype)
            if plan.scale != 1.0:
                hidden = hidden * plan.scale
            return compute(hidden, weight, bias)

        if not self._zero3():
            return forward(hidden)
        with forward_replaced(plan.head, forward):
            return plan.head(hidden)

    def _chunk_size(self, plan: HeadPlan) -> int:
        # out_features, not weight.shape: a ZeRO-3 weight is an empty placeholder between uses
        return self.args.logprob_chunk_size or chunk_size_for(plan.head.out_features)

    def _chunked_logprobs(self, model, plan: HeadPlan, inputs, positions, targets):
        def compute(hidden, weight, bias):
            return chunked_target_logprobs(
                hidden, weight, targets, bias, chunk_size=self._chunk_size(plan), softcap=plan.softcap
            )

        return self._run_head(plan, self._head_hidden(model, plan, inputs, positions), compute)

    def scored_logprobs(self, model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logps [N], mean_logits [N])`` of the batch's scored tokens (``score_*`` fields)."""
        self._first_batch_checks(model, inputs)
        positions, targets = inputs["score_positions"], inputs["score_targets"]
        if self._head_plan is not None:
            return self._chunked_logprobs(model, self._head_plan, inputs, positions, targets)
        with attention_backends(inputs["input_ids"].device):
            logits = model(**self._forward_kwargs(model, inputs), use_cache=False).logits
        return full_target_logprobs(logits.reshape(-1, logits.shape[-1]).index_select(0, positions), targets)

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

    # ---- loss and its normalisation over the optimizer step ----------------------------------------

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step and attach to each the step's total NLL
        token and pair counts (summed over processes), the loss normalisers."""
        batch_samples, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not batch_samples:
            return batch_samples, None
        counts = (
            torch.stack(
                [
                    torch.stack([batch["score_chosen"].sum(), batch["num_pairs"].reshape(())])
                    for batch in batch_samples
                ]
            )
            .sum(0)
            .to(device=device, dtype=torch.float32)
        )
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(counts).reshape(-1, 2).sum(0)
        batch_samples = [
            dict(batch, step_nll_tokens=counts[0], step_pairs=counts[1]) for batch in batch_samples
        ]
        return batch_samples, counts[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        pair, chosen, response = inputs["score_pair"], inputs["score_chosen"], inputs["score_response"]
        num_pairs = _num_pairs(inputs)
        # Per-micro-batch defaults are the batch's own counts; training passes the whole step's.
        normalizers = {
            "nll_normalizer": inputs.get("step_nll_tokens", chosen.sum().clamp(min=1)),
            "pair_normalizer": inputs.get("step_pairs", max(num_pairs, 1)),
        }

        def loss_of(logps, pair, chosen, response, num_pairs):
            return orpo_loss(
                logps,
                pair,
                chosen,
                response,
                num_pairs,
                alpha=self.args.orpo_alpha,
                beta=self.args.orpo_beta,
                **normalizers,
            )

        fused = self._fused_loss(model, inputs, loss_of)
        if fused is not None:
            loss, logps, mean_logits = fused
            _, stats = loss_of(logps, pair, chosen, response, num_pairs)  # metrics; cheap, no head
        else:
            logps, mean_logits = self.scored_logprobs(model, inputs)
            loss, stats = loss_of(logps, pair, chosen, response, num_pairs)
        skipped = False
        if model.training and self.args.nan_policy == "skip":
            # Must be known before the backward: a host sync (skip is single-process, see __init__).
            if not bool(torch.isfinite(loss.detach())):
                loss, skipped = self._skip_non_finite(loss, inputs), True
        elif model.training:  # checked once per optimizer step, with the gradient norm (no extra sync)
            self._step_losses.append((loss.detach(), inputs.get(ROW_INDEX)))
        if "step_pairs" in inputs and self.accelerator.num_processes > 1:
            # Normalised by global counts, but DDP averages gradients over processes: undo that.
            loss = loss * self.accelerator.num_processes
        if not skipped:
            self._record_metrics("train" if model.training else "eval", stats, mean_logits, inputs)
        if return_outputs:
            return loss, {"chosen_logps": stats.chosen_logps, "rejected_logps": stats.rejected_logps}
        return loss

    def _skip_non_finite(self, loss, inputs):
        """``nan_policy: skip``: a zero loss, so the micro-batch adds nothing to the update."""
        rows = inputs[ROW_INDEX].tolist() if ROW_INDEX in inputs else "unknown"
        self._nan_skipped += 1
        logger.warning(
            f"non-finite loss ({loss.item()}) at step {self.state.global_step + 1}, dataset rows {rows}: "
            "batch skipped"
        )
        return torch.zeros((), device=loss.device, requires_grad=True)

    def _raise_on_non_finite_loss(self, model) -> None:
        """``nan_policy: error``, at the end of the step's backward passes, before the optimizer: a
        non-finite micro-batch loss checkpoints the last good state (the weights before this step) and
        stops with the step and the dataset rows. Deferred to here, where the gradient norm syncs the
        host anyway, so the micro-batches run without a host sync each."""
        checks, self._step_losses = self._step_losses, []
        if not checks:
            return
        finite = torch.isfinite(torch.stack([loss for loss, _ in checks]))
        bad = (~finite).sum().float()
        if self.accelerator.num_processes > 1:  # every process takes the same branch
            bad = self.accelerator.reduce(bad, reduction="sum")
        if not bool(bad):
            return
        step = self.state.global_step + 1
        local = [(loss, rows) for (loss, rows), ok in zip(checks, finite.tolist(), strict=True) if not ok]
        rows = [r for _, r in local for r in (r.tolist() if r is not None else ["unknown"])]
        value = local[0][0].item() if local else float("nan")
        where = f"dataset rows {rows}" if local else "another process's batch"
        self._stop_before_step(
            model,
            f"non-finite loss ({value}) at step {step}, {where}",
            ". Check those rows and the learning rate, or pass --nan-policy skip to leave such batches out",
        )

    def _stop_before_step(self, model, problem: str, advice: str = "") -> None:
        """Checkpoint the last good state (the weights before this step: the optimizer has not run)
        and stop with ``problem``, where it was saved, and ``advice``."""
        self._save_checkpoint(model, trial=None)
        raise OrpoError(
            f"{problem}; the weights before this step are saved in "
            f"{self.args.output_dir}/checkpoint-{self.state.global_step}{advice}"
        )

    def _get_grad_norm(self, model, grad_norm=None):
        self._raise_on_non_finite_loss(model)
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not bool(torch.isfinite(torch.as_tensor(grad_norm))):
            # A finite loss with a non-finite gradient cannot be left out of an update already
            # accumulated, so both policies stop here, before the optimizer applies it.
            self._stop_before_step(
                model, f"non-finite gradient norm ({float(grad_norm)}) at step {self.state.global_step + 1}"
            )
        return grad_norm

    def _fused_loss(self, model, inputs, loss_of):
        """The loss with the head fused in (:func:`orpo.logprobs.fused_linear_loss`) when it applies:
        training with gradients, a separable head, and every pair's scored tokens fitting in one
        chunk (chunks are whole pairs, so each chunk's loss and gradient are complete). Returns
        ``(loss, logps, mean_logits)``, or None to use the unfused path."""
        self._first_batch_checks(model, inputs)
        plan = self._head_plan
        if plan is None or not self.args.fused_head_loss or not torch.is_grad_enabled():
            return None
        pair, chosen, response = inputs["score_pair"], inputs["score_chosen"], inputs["score_response"]
        num_pairs = _num_pairs(inputs)
        # scored tokens per pair (pairs are contiguous): from the collator, else counted (a host sync)
        sizes = list(inputs.get("pair_sizes") or torch.bincount(pair, minlength=num_pairs).tolist())
        chunk_size = self._chunk_size(plan)
        # A pair larger than a chunk gets a chunk of its own, up to 4 chunks' worth of logits (still
        # less than a one-pair-per-chunk fused loss such as Liger's holds: it scores the prompt too).
        chunks = segment_chunks(sizes, chunk_size, max_chunk_size=_FUSED_MAX_CHUNKS * chunk_size)
        if chunks is None:
            return None
        first_pair, offset = {}, 0
        for index, size in enumerate(sizes):
            first_pair[offset] = index
            offset += size
        first_pair[offset] = num_pairs

        def chunk_loss(logps, start, end):
            p0 = first_pair[start]
            loss, _ = loss_of(
                logps, pair[start:end] - p0, chosen[start:end], response[start:end], first_pair[end] - p0
            )
            return loss

        def compute(hidden, weight, bias):
            return fused_linear_loss(
                hidden,
                weight,
                inputs["score_targets"],
                bias,
                chunks=chunks,
                loss_fn=chunk_loss,
                softcap=plan.softcap,
            )

        return self._run_head(
            plan, self._head_hidden(model, plan, inputs, inputs["score_positions"]), compute
        )

    def _record_metrics(self, mode, stats, mean_logits, inputs) -> None:
        sums = self._metric_sums[mode]
        for name, value in stats.metric_sums().items():
            sums[name] += value
        response = inputs["score_response"]
        for side, selected in (
            ("chosen", inputs["score_chosen"] & response),
            ("rejected", ~inputs["score_chosen"] & response),
        ):
            sums[f"logits/{side}"] += mean_logits[selected].sum()
            sums[f"logits/{side}_tokens"] += selected.sum().float()
        if "num_tokens" in inputs:  # collators of this package count their real tokens
            laid_out = inputs["input_ids"].numel()
            sums["padding_fraction"] += laid_out - inputs["num_tokens"].float()
            sums["layout_tokens"] += laid_out

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        if prediction_loss_only:
            return loss.detach(), None, None
        # For compute_metrics: per pair (chosen, rejected) mean log-probs; label 0 = chosen preferred.
        logits = torch.stack([outputs["chosen_logps"], outputs["rejected_logps"]], dim=1).detach()
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return loss.detach(), logits, labels

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._eval_prefix = metric_key_prefix
        self._metric_sums["eval"].clear()
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self.args.generate_during_eval:
            self._log_eval_generations(eval_dataset, metric_key_prefix)
        return metrics

    def _log_eval_generations(self, eval_dataset, prefix: str) -> None:
        """``generate_during_eval``: completions for ``per_device_eval_batch_size`` held-out prompts, the
        same ones at every evaluation, logged by :func:`orpo.generation.publish_generations`. Every
        process generates (a sharded model needs all of them in each forward); the first one logs."""
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if isinstance(dataset, str):
            dataset = self.eval_dataset[dataset]
        if not isinstance(dataset, Dataset) or not len(dataset):
            return  # several named sets: evaluate() comes back here for each of them
        rows = sample_indices(len(dataset), self.args.per_device_eval_batch_size, self.args.seed)
        prompts = [list(ids) for ids in dataset.select(rows)["prompt_input_ids"]]
        tokenizer = self.processing_class
        new_tokens = self.args.max_completion_length or max(
            1, (self.args.max_length or 1024) - max(len(ids) for ids in prompts)
        )
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            with self.accelerator.autocast():
                completions = complete(
                    model,
                    prompts,
                    pad_token_id=self._pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                    max_new_tokens=new_tokens,
                    batch_size=self.args.per_device_eval_batch_size,
                )
        finally:
            model.train(was_training)
        if self.is_world_process_zero():
            step = self.state.global_step
            logged = [
                {
                    "step": step,
                    "dataset": prefix,
                    "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                    "completion": tokenizer.decode(completion, skip_special_tokens=True),
                }
                for prompt, completion in zip(prompts, completions, strict=True)
            ]
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
            for name, mean in means_from_sums(dict(zip(names, values.cpu(), strict=True))).items():
                logs[prefix + name] = mean
            sums.clear()
        if mode == "train" and self._nan_skipped:
            logs["nan_skipped_batches"] = self._nan_skipped  # since the start of training
        super().log(logs, start_time)
