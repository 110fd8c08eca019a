"""Generate the shipped quickstart data (src/orpo/demo/train.jsonl, test.jsonl), deterministically.

Task: reverse a word of 3-5 random lowercase letters. Answers come in three qualities, each a near miss
of the next (one token apart, so a pair shares most tokens — the case ORPO exists for):

- best: the reversal, ``smqjb`` -> ``bjqms``;
- flawed: the reversal with an unwanted trailing mark, ``bjqms!`` (a style flaw);
- worse: two marks, ``bjqms!!``.

Like real preference data, the chosen answers are not all perfect: half the training pairs prefer best
over flawed, the other half flawed over worse. SFT on the chosen answers therefore learns to add the mark
half the time — it cannot tell a flaw it was shown as "chosen" from the right answer — while the
preferences rank best > flawed > worse. Every held-out pair is best (chosen) vs flawed (rejected), and
held-out words never occur in the training split. Run from the repository root:
``python scripts/build_demo_data.py``; the output is committed and a test checks that rerunning this
script reproduces it byte for byte.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SEED = 2403_07691  # the paper's arXiv id
TRAIN_PAIRS = 2000
TEST_PAIRS = 200
LETTERS = "abcdefghijklmnopqrstuvwxyz"


FLAW = "!"  # an unwanted trailing mark: a style flaw, one token off the right answer


def make_pair(word: str, prefer_best: bool) -> dict:
    best = word[::-1]
    flawed = best + FLAW
    worse = flawed + FLAW
    chosen, rejected = (best, flawed) if prefer_best else (flawed, worse)
    return {"prompt": f"rev {word}=", "chosen": chosen, "rejected": rejected}


def generate(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < TRAIN_PAIRS + TEST_PAIRS:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    kinds = [True, False] * (TRAIN_PAIRS // 2)  # half best > flawed, half flawed > worse
    rng.shuffle(kinds)
    train = [make_pair(word, kind) for word, kind in zip(words[:TRAIN_PAIRS], kinds, strict=True)]
    test = [make_pair(word, True) for word in words[TRAIN_PAIRS:]]
    return train, test


def write(out_dir: Path) -> None:
    train, test = generate()
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with (out_dir / f"{name}.jsonl").open("w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("src/orpo/demo")
    write(target)
    print(f"wrote {target}/train.jsonl and {target}/test.jsonl")
