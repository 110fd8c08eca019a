"""The LM head, computed outside the model: which heads can be separated (:func:`head_plan_for`),
how the trainer takes the head's input from the model's own forward without the model computing
logits (:class:`HeadInputCapture`), how it runs its head computation through the head module's
hooks (:func:`forward_replaced`), and :class:`HeadRunner`, which puts these together for the trainer:
the body's hidden states at the scored positions only, then the chunked (or fused) head of
:mod:`orpo.logprobs`, checked once against the model's own logits."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from orpo.errors import OrpoError
from orpo.layout_proof import check_mode
from orpo.layouts import first_sequence, model_inputs
from orpo.logprobs import (
    chunk_size_for,
    chunked_target_logprobs,
    full_target_logprobs,
    fused_linear_loss,
    rounding_tolerance,
    segment_chunks,
)
from orpo.models import runs_in_low_precision
from orpo.scored import ScoredTokens

logger = logging.getLogger("orpo")

# How many tokens of the first batch's first row the one-off head self-check compares.
HEAD_CHECK_TOKENS = 64
# The largest chunk (in chunk sizes) the fused head+loss takes for a single pair; beyond it, the
# unfused head keeps memory at one chunk.
FUSED_MAX_CHUNKS = 4


@dataclass
class HeadPlan:
    """How to turn the hidden state fed to the LM head into logits, outside the model.

    ``logits = softcap(scale * (hidden @ head.weight.T + head.bias))``. ``None`` as a plan means
    the head cannot be separated and full logits are used.
    """

    head: nn.Linear
    scale: float = 1.0
    softcap: float | None = None


def _plain_linear(module) -> bool:
    """An ``nn.Linear`` itself, or one FSDP2 shards (class ``FSDPLinear``), not a subclass such as a
    quantized layer."""
    if type(module) is nn.Linear:
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    bases = [base for base in type(module).__bases__ if not issubclass(base, FSDPModule)]
    return isinstance(module, FSDPModule) and bases == [nn.Linear]


def head_plan_for(model: nn.Module) -> HeadPlan | None:
    """The separable LM head of ``model``, or None (then full logits are computed).

    Plain ``nn.Linear`` heads (tied or not, with or without bias) are separable; so are the known
    post-head transforms: Cohere's ``logit_scale``, Granite's ``logits_scaling`` and Gemma-2's
    ``final_logit_softcapping``. Quantized or adapter-wrapped heads are not.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not _plain_linear(head):
        return None
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return HeadPlan(head=head, scale=scale, softcap=float(softcap) if softcap else None)


class HeadInputCapture:
    """A forward pre-hook on the LM head: while :meth:`capturing`, the head's input is recorded in
    ``hidden`` and the head is fed zero positions, so the model's own forward computes no logits.

    Registered once per head and switched by a flag, not added per call: torch.compile does not watch
    a module's hooks (dynamo skips hook guards), so a hook added after the model was first compiled
    would never run; a flag it reads is guarded, and each state gets its own graph."""

    def __init__(self, head: nn.Module):
        self.head = head
        self.active = False
        self.hidden: torch.Tensor | None = None
        # First among the head's hooks: an engine's hooks (ZeRO-3 ties its backward bookkeeping to the
        # head's input) then see only the empty slice the head computes on, never the captured states.
        self.handle = head.register_forward_pre_hook(self._pre_hook, prepend=True)

    def _pre_hook(self, module, args):
        if not self.active:
            return None
        self.hidden = args[0]
        return (args[0][..., :0, :],) + tuple(args[1:])

    @contextlib.contextmanager
    def capturing(self):
        self.active, self.hidden = True, None
        try:
            yield self
        finally:
            self.active = False

    def take(self) -> torch.Tensor:
        """The recorded input, released here so the capture holds no activations between calls."""
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError("the LM head was not called during the model's forward")
        return hidden


@contextlib.contextmanager
def forward_replaced(module: nn.Module, forward):
    """While active, ``module(...)`` runs ``forward`` instead of the module's own, through the
    module's hooks as usual."""
    own = module.__dict__.get("forward")  # an instance-level forward (some wrappers set one)
    module.forward = forward
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def attention_backends(device: torch.device):
    """On CUDA, sdpa without its cuDNN backend: cuDNN plans each new shape on the host (~2.5 ms per
    attention call on an H200, measured), and batch shapes change every step, so a 0.5B model spent
    a third of its host time there while the GPU waited; flash / memory-efficient kernels take the
    same inputs. Elsewhere, no change."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@dataclass
class HeadSettings:
    """What the trainer tells the head runner about the run."""

    chunk_size: int | None  # tokens per head chunk; None: from the vocabulary (orpo.logprobs)
    fused: bool  # fused head + loss where every pair fits (ORPOConfig.fused_head_loss)
    low_precision: bool  # bf16/fp16 training or a half-precision model: rounding-level tolerances
    zero3: bool  # DeepSpeed ZeRO-3: the head's weight is whole only inside its module's call
    weight_partitioned: bool  # FSDP1: the head's weight is a shard outside the forward; use the model's

    @classmethod
    def for_trainer(cls, trainer) -> HeadSettings:
        """From an ``ORPOTrainer`` after Trainer's set-up (its args, model and engine)."""
        accelerator = trainer.accelerator
        zero3 = (
            trainer.is_deepspeed_enabled and getattr(accelerator.state.deepspeed_plugin, "zero_stage", 0) == 3
        )
        return cls(
            chunk_size=trainer.args.logprob_chunk_size,
            fused=trainer.args.fused_head_loss,
            low_precision=trainer.model is not None and runs_in_low_precision(trainer.model, trainer.args),
            zero3=zero3,
            # FSDP2 as accelerate applies it keeps the head unsharded from the forward to the backward;
            # FSDP1's flat parameters do not (tests: 2 processes == 1 process for FSDP2 and ZeRO-3).
            weight_partitioned=getattr(trainer, "is_fsdp_enabled", False)
            and not getattr(accelerator, "is_fsdp2", False),
        )


class HeadRunner:
    """Log-probs of a batch's scored tokens (the positions and targets of its :class:`~orpo.scored.ScoredTokens`).

    The model body runs with its LM head fed zero positions (:class:`HeadInputCapture`); the head is then
    applied to the final hidden states at the scored positions only, a chunk at a time. Before the first
    batch is scored, :meth:`resolve` finds the head (:func:`head_plan_for`) and checks it against the
    model's own logits on the batch's first sequence; a head it cannot separate, or one that disagrees,
    falls back to the model's full logits with a warning. A collated batch becomes forward arguments by its
    layout's rules (:func:`orpo.layouts.model_inputs`)."""

    def __init__(self, accelerator, settings: HeadSettings):
        self.accelerator = accelerator
        self.settings = settings
        self.resolved = False
        self._config_of: tuple[nn.Module, object] | None = None  # (model, its config), see model_config
        self.plan: HeadPlan | None = None  # once resolved: None = the model's own full logits
        self._capture: HeadInputCapture | None = None

    def register(self, unwrapped: nn.Module) -> None:
        """Hook the model's LM head now, ahead of any compiled call of the model (see HeadInputCapture)."""
        if hasattr(unwrapped, "get_output_embeddings"):
            self._capture_for(unwrapped.get_output_embeddings())

    def _capture_for(self, head: nn.Module | None) -> HeadInputCapture | None:
        if not isinstance(head, nn.Linear):
            return None
        if self._capture is None or self._capture.head is not head:
            if self._capture is not None:
                self._capture.handle.remove()
            self._capture = HeadInputCapture(head)
        return self._capture

    def use_model_logits(self) -> None:
        """Skip the separated head: every batch is scored from the model's own full logits (the reference
        the benchmarks compare the chunked head with)."""
        self.resolved, self.plan = True, None

    def chunk_size(self, plan: HeadPlan) -> int:
        # out_features, not weight.shape: a ZeRO-3 weight is an empty placeholder between uses
        return self.settings.chunk_size or chunk_size_for(plan.head.out_features)

    def model_config(self, model):
        """The config of the model under any wrapper, found once per model: accelerate's
        ``unwrap_model`` looks up installed packages on every call (~2.5 ms, as long as a tiny model's
        forward), which per micro-batch would be host time a GPU waits for."""
        if self._config_of is None or self._config_of[0] is not model:
            self._config_of = (model, self.accelerator.unwrap_model(model).config)
        return self._config_of[1]

    def model_kwargs(self, model, inputs: dict) -> dict:
        """The forward arguments of a collated batch (:func:`orpo.layouts.model_inputs`)."""
        try:
            return model_inputs(inputs, self.model_config(model), next(model.parameters()).dtype)
        except ValueError as err:
            raise OrpoError(f"{err}; set prefix_sharing: false or attn_implementation: sdpa") from err

    def resolve(self, model: nn.Module, inputs: dict) -> None:
        """Find the separable head once and check it on a few tokens of the first batch (in
        :func:`orpo.layout_proof.check_mode`, which makes the model deterministic for the comparison)."""
        self.resolved = True
        self.plan = None
        if self.settings.weight_partitioned:
            logger.info(
                "FSDP1 shards the LM head's weight outside its forward: computing it inside the model"
            )
            return
        unwrapped = self.accelerator.unwrap_model(model)
        self.register(unwrapped)
        plan = head_plan_for(unwrapped)
        if plan is None:
            warnings.warn(
                "the model's LM head is not a plain nn.Linear (quantized, adapter-wrapped or custom): "
                "computing full logits, which costs batch x seq x vocab memory",
                stacklevel=3,
            )
            return
        check = first_sequence(inputs, HEAD_CHECK_TOKENS)
        length = check["input_ids"].shape[1]
        if length < 2:
            self.plan = plan
            return
        targets = check["input_ids"][0, 1:]
        positions = torch.arange(length - 1, device=targets.device)
        with check_mode(model):
            logits = model(**check, use_cache=False).logits[0, :-1]
            reference, _ = full_target_logprobs(logits, targets)
            try:
                ours, _ = self._chunked(model, plan, check, positions, targets)
            except RuntimeError as err:  # e.g. a head weight an engine left sharded after the forward
                warnings.warn(
                    f"the LM head cannot be computed outside the model ({err}); computing full logits",
                    stacklevel=3,
                )
                return
        error = (reference - ours).abs().max().item()
        if not error <= rounding_tolerance(self.settings.low_precision, logits.abs().max().item()):
            warnings.warn(
                f"the separated LM head disagrees with the model's own logits (max |Δ log p| = {error:.3g}); "
                "this architecture transforms logits in a way orpo does not know, so full logits are used",
                stacklevel=3,
            )
            return
        self.plan = plan

    def logprobs(
        self, model: nn.Module, inputs: dict, scored: ScoredTokens
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logps [N], mean_logits [N])`` of the batch's scored tokens."""
        if self.plan is not None:
            return self._chunked(model, self.plan, inputs, scored.positions, scored.targets)
        with attention_backends(inputs["input_ids"].device):
            logits = model(**self.model_kwargs(model, inputs), use_cache=False).logits
        flat = logits.reshape(-1, logits.shape[-1]).index_select(0, scored.positions)
        return full_target_logprobs(flat, scored.targets)

    def fused_loss(self, model: nn.Module, inputs: dict, scored: ScoredTokens, pair_loss):
        """The loss with the head fused in (:func:`orpo.logprobs.fused_linear_loss`) when it applies:
        gradients on, a separable head, and every pair's scored tokens (contiguous) fitting in a chunk of at
        most :data:`FUSED_MAX_CHUNKS` chunk sizes (chunks are whole pairs, so each chunk's loss and gradient
        are complete). ``pair_loss.chunk_loss(scored)`` (:class:`orpo.loss.PairLoss`) gives the loss of a
        range of whole pairs. Returns ``(loss, logps, mean_logits)``, or None for the unfused path."""
        plan = self.plan
        if plan is None or not self.settings.fused or not torch.is_grad_enabled():
            return None
        chunk_size = self.chunk_size(plan)
        # A pair larger than a chunk gets a chunk of its own, up to 4 chunks' worth of logits (still
        # less than a one-pair-per-chunk fused loss such as Liger's holds: it scores the prompt too).
        chunks = segment_chunks(scored.pair_sizes, chunk_size, max_chunk_size=FUSED_MAX_CHUNKS * chunk_size)
        if chunks is None:
            return None
        compute = partial_head(
            fused_linear_loss,
            targets=scored.targets,
            chunks=chunks,
            loss_fn=pair_loss.chunk_loss(scored),
            plan=plan,
        )
        return self._run(plan, self._hidden(model, plan, inputs, scored.positions), compute)

    def _chunked(self, model, plan: HeadPlan, inputs, positions, targets):
        compute = partial_head(
            chunked_target_logprobs, targets=targets, chunk_size=self.chunk_size(plan), plan=plan
        )
        return self._run(plan, self._hidden(model, plan, inputs, positions), compute)

    def _hidden(self, model, plan: HeadPlan, inputs, positions) -> torch.Tensor:
        """Run the model body; the final hidden states ``[N, H]`` at the scored positions."""
        capture = self._capture_for(plan.head)
        with capture.capturing(), attention_backends(inputs["input_ids"].device):
            model(**self.model_kwargs(model, inputs), use_cache=False)
        hidden = capture.take()
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)

    def _run(self, plan: HeadPlan, hidden: torch.Tensor, compute):
        """``compute(hidden, weight, bias, compute_dtype)`` with the matmuls in the dtype the model's own head
        would compute in (``compute_dtype``: the autocast dtype under mixed precision, else None: the
        weight's) and the head's logit scale applied.

        Under ZeRO-3 a parameter is whole only during the forward and backward of the module that owns
        it, so ``compute`` then runs as a call of the head module: DeepSpeed's own hooks gather the
        weight for it, again when gradients reach its outputs, and hold it until the weight's gradient
        is accumulated and reduced (as for any module; a gather of our own would end too early)."""
        accelerator = self.accelerator

        def forward(hidden):
            weight, bias = plan.head.weight, plan.head.bias
            compute_dtype = None
            with accelerator.autocast():  # mixed precision autocasts the model's forward, not our code
                if torch.is_autocast_enabled(hidden.device.type):
                    # The model's own head would run in the autocast dtype; so do our matmuls (and their
                    # backward), with the weight cast once per call and its gradient kept in fp32.
                    compute_dtype = torch.get_autocast_dtype(hidden.device.type)
            if plan.scale != 1.0:
                hidden = hidden * plan.scale
            return compute(hidden, weight, bias, compute_dtype)

        if not self.settings.zero3:
            return forward(hidden)
        with forward_replaced(plan.head, forward):
            return plan.head(hidden)


def partial_head(head_function: Callable, *, targets, plan: HeadPlan, **options) -> Callable:
    """``compute(hidden, weight, bias, compute_dtype)`` for :meth:`HeadRunner._run`: ``head_function`` of
    :mod:`orpo.logprobs` with the targets, the plan's soft-cap and its own options bound."""

    def compute(hidden, weight, bias, compute_dtype):
        return head_function(
            hidden, weight, targets, bias, softcap=plan.softcap, compute_dtype=compute_dtype, **options
        )

    return compute
