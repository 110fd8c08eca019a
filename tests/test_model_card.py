"""The model card (issue 27 item 5): a ``README.md`` beside every saved model and checkpoint, and
``push_to_hub`` with TRL's keyword arguments (``tags``, ``dataset_name``) and transformers' own, the upload
replaced (no network here)."""

import types

import pytest
import yaml
from datasets import Dataset

from conftest import make_model, orpo_args, toy_rows
from orpo import ORPOTrainer
from orpo.model_card import ORPO_CITATION, hub_name


def front_matter(path):
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1]), text


class FakeHub:
    """Stands in for transformers' ``hf_api()``: records the repository creation and the upload."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return types.SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        return "commit"


@pytest.fixture
def trained(tmp_path, tokenizer, monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr("transformers.trainer.hf_api", lambda: hub)
    trainer = ORPOTrainer(
        model=make_model(),
        args=orpo_args(
            tmp_path,
            max_steps=2,
            per_device_train_batch_size=4,
            eval_strategy="steps",
            eval_steps=2,
            save_strategy="steps",
            save_steps=2,
            hub_model_id="me/tiny-orpo",
        ),
        train_dataset=Dataset.from_list(toy_rows(8)),
        eval_dataset=Dataset.from_list(toy_rows(4, seed=1)),
        processing_class=tokenizer,
    )
    trainer.train()
    return trainer, hub


def test_every_saved_model_and_checkpoint_has_a_card(trained, tmp_path):
    trainer, _ = trained
    trainer.save_model(str(tmp_path / "final"))
    for folder in (tmp_path / "final", tmp_path / "out" / "checkpoint-2"):
        meta, text = front_matter(folder / "README.md")
        assert {"trl", "orpo"} <= set(meta["tags"]) and meta["library_name"] == "transformers"
        assert "`orpo_alpha (λ)` | 0.1" in text and "`nll_include_prompt` | True" in text
        assert "batch layout" in text and ORPO_CITATION in text and "- transformers: " in text
        assert "`eval_rewards/accuracies`" in text  # the final held-out metrics: it was evaluated at step 2


def test_push_to_hub_takes_trls_keyword_arguments(trained, tmp_path):
    trainer, hub = trained
    trainer.push_to_hub(tags=["smol-course", "module_1"], dataset_name="trl-lib/ultrafeedback_binarized")
    upload = [call for call in hub.calls if call[0] == "upload_folder"][-1]
    assert upload[1] == "me/tiny-orpo" and upload[2]["folder_path"] == trainer.args.output_dir
    meta, text = front_matter(tmp_path / "out" / "README.md")
    assert meta["datasets"] == ["trl-lib/ultrafeedback_binarized"] and meta["model_name"] == "tiny-orpo"
    assert {"smol-course", "module_1", "trl", "orpo"} <= set(meta["tags"])
    assert 'model="me/tiny-orpo"' in text


def test_push_to_hub_takes_transformers_keyword_arguments(trained, tmp_path):
    trainer, _ = trained
    trainer.push_to_hub(
        commit_message="done",
        license="apache-2.0",
        language="en",
        finetuned_from="HuggingFaceTB/SmolLM2-135M",
    )
    meta, _ = front_matter(tmp_path / "out" / "README.md")
    assert meta["license"] == "apache-2.0" and meta["language"] == "en"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"


def test_base_model_is_named_only_when_it_is_a_hub_name(tmp_path):
    assert hub_name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert hub_name(str(tmp_path)) is None and hub_name("./model") is None and hub_name("a/b/c") is None
