"""The private ``transformers.Trainer`` methods ORPOTrainer overrides or calls still exist in the installed
transformers, with the parameters we use: an upgrade that renames or reshapes one fails here, loudly,
instead of silently changing training (an override of a method Trainer no longer calls is never run)."""

import inspect

import pytest
from transformers import Trainer

from orpo.checkpoints import AtomicCheckpoints
from orpo.trainer import PRIVATE_TRAINER_API, ORPOTrainer


@pytest.mark.parametrize("name", sorted(PRIVATE_TRAINER_API))
def test_the_private_trainer_method_exists_with_our_parameters(name):
    use, parameters = PRIVATE_TRAINER_API[name]
    method = getattr(Trainer, name, None)
    assert callable(method), f"transformers.Trainer.{name} is gone"
    assert list(inspect.signature(method).parameters)[1:] == list(parameters), name
    if "o" in use:  # and we really override it (here or in the checkpoint mixin)
        assert getattr(ORPOTrainer, name) is not method
        assert name in vars(ORPOTrainer) or name in vars(AtomicCheckpoints)


def test_every_private_override_is_listed():
    own = {
        n
        for cls in (ORPOTrainer, AtomicCheckpoints)
        for n in vars(cls)
        if n.startswith("_") and not n.startswith("__")
    }
    overridden = {n for n in own if hasattr(Trainer, n)}
    assert overridden == {n for n, (use, _) in PRIVATE_TRAINER_API.items() if "o" in use}
