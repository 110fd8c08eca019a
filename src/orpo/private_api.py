"""The private names of transformers (and torch) that orpo overrides, calls, reads or sets, in one place: an
upgrade that renames, reshapes or drops one fails ``tests/test_trainer_api.py`` loudly, instead of silently
changing training (an override of a method Trainer no longer calls is never run; an attribute set that nothing
reads any more changes nothing)."""

# Private Trainer methods ORPOTrainer overrides (o) or calls (c), with the parameters it uses. _get_output_dir and
# _save_checkpoint are overridden in orpo.checkpoints.
PRIVATE_TRAINER_API = {
    "_get_train_sampler": ("o", ("train_dataset",)),
    "_track_num_input_tokens": ("o", ("inputs",)),
    "_set_signature_columns_if_needed": ("o", ()),
    "_save": ("o", ("output_dir", "state_dict")),
    "_get_grad_norm": ("o", ("model", "grad_norm")),
    "_get_output_dir": ("o", ("trial",)),
    "_save_checkpoint": ("o+c", ("model", "trial")),
    "_remove_unused_columns": ("c", ("dataset", "description")),
    "_prepare_inputs": ("c", ("inputs",)),
}

# Private (or undocumented) attributes and parameters, ``owner.name``: what orpo does with each, and where.
PRIVATE_ATTRIBUTES = {
    "PretrainedConfig._attn_implementation": "read: the attention backend a batch layout needs (orpo.layouts)",
    "PretrainedConfig._name_or_path": "set: a GGUF model's name becomes its file (orpo.models)",
    "PreTrainedModel.hf_quantizer": "set to None: a GGUF model transformers dequantized is a plain one (orpo.models)",
    "PreTrainedModel.all_tied_weights_keys": "read: a tied weight saved once (ORPOTrainer._save)",
    "TrainingArguments._VALID_DICT_FIELDS": "extended: ORPOConfig's fields that take a JSON string (orpo.config)",
    "Trainer._signature_columns": "set: the columns the collator needs survive remove_unused_columns (ORPOTrainer)",
    "create_block_mask._compile": "passed: flex attention's block masks built compiled (orpo.layouts)",
}
