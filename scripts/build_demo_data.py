"""Generate the shipped quickstart data (src/orpo/demo/train.jsonl, test.jsonl), deterministically.

Task: reverse a word of 3-5 random lowercase letters. ``chosen`` is the reversal; ``rejected`` is a
near miss of it — two adjacent letters swapped — so the pair shares most tokens, the case ORPO
exists for (SFT on the chosen answer raises the probability of such answers too). Held-out words
never occur in the training split. Run from the repository root:
``python scripts/build_demo_data.py``; the output is committed and a test checks that rerunning
this script reproduces it byte for byte.
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


def near_miss(answer: str, rng: random.Random) -> str:
    """``answer`` with two adjacent, different letters swapped (never equal to ``answer``)."""
    positions = [i for i in range(len(answer) - 1) if answer[i] != answer[i + 1]]
    if not positions:  # every letter the same: change one instead
        i = rng.randrange(len(answer))
        return answer[:i] + rng.choice(LETTERS.replace(answer[i], "")) + answer[i + 1 :]
    i = rng.choice(positions)
    return answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :]


def make_pair(word: str, rng: random.Random) -> dict:
    answer = word[::-1]
    return {"prompt": f"rev {word}=", "chosen": answer, "rejected": near_miss(answer, rng)}


def generate(seed: int = SEED) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < TRAIN_PAIRS + TEST_PAIRS:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 5)))
        if word not in seen:
            seen.add(word)
            words.append(word)
    pairs = [make_pair(word, rng) for word in words]
    return pairs[:TRAIN_PAIRS], pairs[TRAIN_PAIRS:]


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
