"""GGUF export (orpo.export, `orpo export`): tiny Llama (tied and untied, grouped-query attention) and Qwen2
(with biases) written as GGUF and read back with gguf's reader (keys, tensor types) and with transformers
(logits); the tokenizer, chat template and special tokens; refusals before anything is written."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

from orpo.cli import main
from orpo.demo import demo_tokenizer, tiny_model
from orpo.errors import OrpoError
from orpo.export import export_gguf

SMALL = dict(
    vocab_size=259, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=128
)
LOGIT_TOLERANCE = {"f32": 1e-6, "f16": 1e-3, "q8_0": 2e-2}


def _model(kind: str, seed: int = 0):
    """A tiny Llama or Qwen2 with random weights large enough that quantization shows."""
    torch.manual_seed(seed)
    if kind == "llama-tied-gqa":
        config = LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    elif kind == "llama-untied":
        config = LlamaConfig(**SMALL, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    elif kind == "mistral":  # llama.cpp runs it as llama
        config = MistralConfig(**SMALL, num_attention_heads=4, num_key_value_heads=1, sliding_window=None)
    else:  # Qwen2: q/k/v biases, no permuted rotary layout in llama.cpp
        config = Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    config.eos_token_id, config.pad_token_id, config.bos_token_id = 2, 0, None
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # biases start at zero: make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    return model


def _saved(tmp_path, kind: str):
    # Not named after the kind: transformers' GGUF reader takes a general.name containing "mistral" for
    # its own mistral loader, which gguf-py does not map (llama.cpp reads only general.architecture).
    folder = tmp_path / f"saved-{kind.replace('mistral', 'm')}"
    model = _model(kind)
    model.save_pretrained(folder)
    demo_tokenizer().save_pretrained(folder)
    return model, folder


def _fields(path) -> dict:
    reader = gguf.GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


IDS = torch.tensor([[1, 87, 85, 71, 84, 201, 74, 75, 2, 201, 1, 67, 85, 85, 75, 85, 86]])


@pytest.mark.parametrize("kind", ["llama-tied-gqa", "llama-untied", "mistral", "qwen2"])
@pytest.mark.parametrize("gguf_type", ["f32", "f16", "q8_0"])
def test_exported_logits_match_the_model(tmp_path, kind, gguf_type):
    model, folder = _saved(tmp_path, kind)
    out = tmp_path / f"{kind}.gguf"
    summary = export_gguf(folder, out, gguf_type, progress=False)
    assert summary.path == out and out.stat().st_size == summary.bytes
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name).eval()
    with torch.no_grad():
        difference = (back(IDS).logits - model(IDS).logits).abs().max().item()
    assert difference <= LOGIT_TOLERANCE[gguf_type], difference
    if gguf_type != "f32":  # a lower type must actually be lower
        assert difference > 0


@pytest.mark.parametrize("kind", ["llama-tied-gqa", "llama-untied", "qwen2"])
def test_keys_and_tensor_types(tmp_path, kind):
    model, folder = _saved(tmp_path, kind)
    out = tmp_path / "m.gguf"
    export_gguf(folder, out, "q8_0", progress=False)
    fields, types = _fields(out), _tensor_types(out)
    arch = "qwen2" if kind == "qwen2" else "llama"
    config = model.config
    assert fields["general.architecture"] == arch
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields[f"{arch}.block_count"] == 2
    assert fields[f"{arch}.embedding_length"] == 64
    assert fields[f"{arch}.feed_forward_length"] == 96
    assert fields[f"{arch}.attention.head_count"] == 4
    assert fields[f"{arch}.attention.head_count_kv"] == config.num_key_value_heads
    assert fields[f"{arch}.context_length"] == 128
    assert fields[f"{arch}.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    # Norms and biases in F32, every matrix in Q8_0; a tied head has no output tensor.
    for name, qtype in types.items():
        expected = "F32" if name.endswith(("_norm.weight", ".bias")) else "Q8_0"
        assert qtype == expected, name
    assert ("output.weight" in types) == (kind == "llama-untied")
    assert any(name.endswith("attn_q.bias") for name in types) == (kind == "qwen2")


def test_the_tokenizer_chat_template_and_special_tokens_survive(tmp_path):
    _, folder = _saved(tmp_path, "llama-tied-gqa")
    out = tmp_path / "m.gguf"
    summary = export_gguf(folder, out, "f16", progress=False)
    fields = _fields(out)
    tokenizer = demo_tokenizer()
    assert summary.pre_tokenizer == "default"  # no merges: byte by byte whatever the split
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert fields["tokenizer.ggml.tokens"] == [tokenizer.convert_ids_to_tokens(i) for i in range(259)]
    types = fields["tokenizer.ggml.token_type"]
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and set(types[3:]) == {gguf.TokenType.NORMAL}
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id == 2
    assert fields["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert "tokenizer.ggml.bos_token_id" not in fields  # the demo has no BOS
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.add_eos_token"] is False
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert len(fields["tokenizer.ggml.merges"]) == 1  # the placeholder llama.cpp needs, which never applies


def test_a_bpe_tokenizer_with_merges_round_trips_through_transformers(tmp_path):
    """A real byte-level BPE (trained here) keeps its merges and tokenizes the same when transformers reads
    the file back; its unknown fingerprint needs --tokenizer-pre, and a wrong name is refused."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(["the answer is one sentence, then it stops."] * 50, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = demo_tokenizer().chat_template
    model = tiny_model(vocab_size=len(tokenizer))
    folder = tmp_path / "bpe"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    with pytest.raises(OrpoError, match="--tokenizer-pre NAME"):
        export_gguf(folder, tmp_path / "x.gguf", "f32", progress=False)
    with pytest.raises(OrpoError, match="not a pre-tokenizer llama.cpp knows"):
        export_gguf(folder, tmp_path / "x.gguf", "f32", tokenizer_pre="gpt2", progress=False)
    assert not list(tmp_path.glob("x.gguf*"))
    export_gguf(folder, tmp_path / "x.gguf", "f32", tokenizer_pre="gpt-2", progress=False)
    fields = _fields(tmp_path / "x.gguf")
    assert fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.merges"]) == len(json.loads(bpe.to_str())["model"]["merges"])
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="x.gguf")
    text = "<|im_start|>user\nthe answer, then it stops.<|im_end|>"
    assert back.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert back.eos_token == "<|im_end|>"


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path):
    model = tiny_model()
    model.config.rope_parameters = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    out = tmp_path / "l3.gguf"
    export_gguf(model, out, "q8_0", tokenizer=demo_tokenizer(), progress=False)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    freqs = tensors["rope_freqs.weight"]
    assert freqs.tensor_type.name == "F32" and list(freqs.shape) == [8]  # head_dim 16 / 2
    # The high frequencies keep their value (factor 1), the low ones are divided by the full factor.
    values = np.asarray(freqs.data)
    assert values[0] == 1.0 and values[-1] == 32.0 and np.all(np.diff(values) >= 0)
    assert "llama.rope.scaling.type" not in _fields(out)


def test_low_bit_types_keep_the_output_projection_at_q8_0(tmp_path):
    _, folder = _saved(tmp_path, "llama-untied")
    out = tmp_path / "q4.gguf"
    export_gguf(folder, out, "q4_1", progress=False)
    types = _tensor_types(out)
    assert types["output.weight"] == "Q8_0" and types["token_embd.weight"] == "Q4_1"
    assert types["blk.0.attn_q.weight"] == "Q4_1" and types["blk.0.attn_norm.weight"] == "F32"
    tied = tmp_path / "tied.gguf"
    export_gguf(_saved(tmp_path, "llama-tied-gqa")[1], tied, "q4_0", progress=False)
    assert _tensor_types(tied)["token_embd.weight"] == "Q8_0"  # it is the output projection too


def test_rows_that_do_not_split_into_blocks_fall_back_to_f16(tmp_path):
    model = tiny_model(intermediate_size=200)  # ffn_down rows of 200 values: not a multiple of 32
    out = tmp_path / "odd.gguf"
    export_gguf(model, out, "q8_0", tokenizer=demo_tokenizer(), progress=False)
    types = _tensor_types(out)
    assert types["blk.0.ffn_down.weight"] == "F16" and types["blk.0.ffn_up.weight"] == "Q8_0"


def test_an_unsupported_architecture_is_refused_before_writing(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=259)).save_pretrained(folder)
    demo_tokenizer().save_pretrained(folder)
    with pytest.raises(OrpoError, match="supports LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        export_gguf(folder, tmp_path / "g.gguf", progress=False)
    assert list(tmp_path.glob("g.gguf*")) == []


def test_a_non_byte_level_tokenizer_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "wl"
    tiny_model(vocab_size=2).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(folder)
    with pytest.raises(OrpoError, match="the tokenizer is WordLevel; GGUF export supports byte-level BPE"):
        export_gguf(folder, tmp_path / "w.gguf", progress=False)


def test_an_interrupted_export_leaves_nothing_behind(tmp_path, monkeypatch):
    _, folder = _saved(tmp_path, "llama-tied-gqa")
    written = []

    def interrupt_after_two(self, tensor, *args, **kwargs):
        written.append(1)
        if len(written) > 2:
            raise KeyboardInterrupt
        return original(self, tensor, *args, **kwargs)

    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        export_gguf(folder, tmp_path / "cut.gguf", progress=False)
    assert list(tmp_path.glob("cut.gguf*")) == []


def test_a_lora_adapter_folder_is_merged_first(tmp_path):
    peft = pytest.importorskip("peft")
    base, folder = _saved(tmp_path, "llama-tied-gqa")
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adapted = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(folder), lora)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a fresh adapter is zero: make it change the model
    adapter = tmp_path / "adapter"
    adapted.save_pretrained(adapter)
    demo_tokenizer().save_pretrained(adapter)
    export_gguf(adapter, tmp_path / "a.gguf", "f32", progress=False)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="a.gguf").eval()
    with torch.no_grad():
        merged = adapted.eval()(IDS).logits
        assert (back(IDS).logits - merged).abs().max() < 1e-5
        assert (base(IDS).logits - merged).abs().max() > 1e-2


def test_the_command_writes_the_file_and_says_what_it_wrote(tmp_path, capsys):
    _, folder = _saved(tmp_path, "qwen2")
    out = tmp_path / "cli.gguf"
    assert main(["export", str(folder), "--gguf", str(out), "--type", "q4_0", "--quiet"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}: q4_0" in said and "MiB" in said and "architecture qwen2" in said
    assert _fields(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert main(["export", str(folder), "--gguf", str(out)]) == 2  # exists: not replaced unasked
    assert "exists; choose another name, or pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(folder), "--gguf", str(out), "--overwrite", "--quiet"]) == 0
    assert _fields(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0  # the default type
    assert main(["export", str(tmp_path / "missing"), "--gguf", str(tmp_path / "m.gguf")]) == 1
    assert "not a model folder" in capsys.readouterr().err


def test_a_training_config_with_gguf_writes_the_file_beside_the_model(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: demo\ndatasets: demo:train\nmax_steps: 1\nper_device_train_batch_size: 2\n"
        f"output_dir: {tmp_path / 'out'}\nreport_to: none\nsave_strategy: 'no'\ngguf: f16\n"
    )
    assert main(["train", str(config), "--quiet"]) == 0
    out = tmp_path / "out" / "model-f16.gguf"
    assert out.is_file() and f"wrote {out}: f16" in capsys.readouterr().out
    assert _fields(out)["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    config.write_text(config.read_text().replace("gguf: f16", "gguf: q3_k"))
    assert main(["train", str(config), "--quiet"]) == 2
    assert "'gguf' must be a GGUF type" in capsys.readouterr().err


def test_every_offered_type_is_written():
    from orpo.export import TYPES
    from orpo.export.tensor_types import EXPORT_TYPES

    assert set(TYPES) == set(EXPORT_TYPES)
