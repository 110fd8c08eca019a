"""The private ``transformers.Trainer`` methods ORPOTrainer overrides or calls, and the private attributes orpo
reads or sets (:mod:`orpo.private_api`), still exist in the installed transformers and torch, with the
parameters we use: an upgrade that renames or reshapes one fails here, loudly, instead of silently changing
training (an override of a method Trainer no longer calls is never run)."""

import inspect

import pytest
from transformers import Trainer

from orpo.checkpoints import AtomicCheckpoints
from orpo.private_api import PRIVATE_ATTRIBUTES
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


def _owners(tmp_path):
    """Each owner named in PRIVATE_ATTRIBUTES, as an object that has the attribute when transformers still does."""
    from datasets import Dataset
    from torch.nn.attention.flex_attention import create_block_mask
    from transformers import TrainingArguments

    from conftest import make_model, orpo_args, toy_rows
    from orpo.demo import demo_tokenizer

    model = make_model()
    trainer = ORPOTrainer(
        model=model,
        args=orpo_args(tmp_path),
        train_dataset=Dataset.from_list(toy_rows(4)),
        tokenizer=demo_tokenizer(),
    )
    return {
        "PretrainedConfig": model.config,
        "PreTrainedModel": model,
        "TrainingArguments": TrainingArguments,
        "Trainer": trainer,
        "create_block_mask": inspect.signature(create_block_mask).parameters,
    }


def test_the_private_attributes_we_use_exist(tmp_path):
    """Each is an attribute of its owner, or (one transformers sets only on some models and reads with getattr,
    such as hf_quantizer) named in the source of the transformers module that defines the owner's class."""
    import sys

    owners = _owners(tmp_path)
    for entry in PRIVATE_ATTRIBUTES:
        owner, name = entry.split(".", 1)
        found = owners[owner]
        if owner == "create_block_mask":
            assert name in found, f"{entry} is gone"
            continue
        defining = [
            sys.modules[c.__module__] for c in type(found).__mro__ if c.__module__.startswith("transformers.")
        ]
        assert hasattr(found, name) or any(name in inspect.getsource(m) for m in defining), f"{entry} is gone"
