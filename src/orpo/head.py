"""The LM head, computed outside the model: which heads can be separated (:func:`head_plan_for`),
how the trainer takes the head's input from the model's own forward without the model computing
logits (:class:`HeadInputCapture`), and how it runs its head computation through the head module's
hooks (:func:`forward_replaced`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


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
