"""The behaviour the real-model exercise teaches SmolLM2-135M-Instruct: answer in one sentence.

The model answers "Explain X." with several sentences (none of the 97 held-out prompts gets a one-sentence
answer). The exercise's chosen answers are the first sentence of the model's own answer, so they say
nothing the model would not; only the length differs. One definition serves the data builder
(``scripts/build_smollm2_data.py``) and the check of generations, so both count sentences alike.
"""

from __future__ import annotations

import re

# A sentence ends at . ! or ? (and any closing quote or bracket) followed by white space and an upper-case
# letter, digit, quote or bracket, or by the end of the text. A decimal point has no space after it, and
# "e.g. the" continues in lower case, so neither ends a sentence.
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+[A-Z0-9\"'(\[]|\s*$)")
MIN_WORDS = 4  # shorter "first sentences" are interjections ("Sure!"), not answers


def first_sentence(text: str) -> str | None:
    """The text's first sentence, or None when it does not start with a plain one (markdown, a list, an
    interjection shorter than MIN_WORDS, or no sentence end at all)."""
    text = text.strip()
    end = _SENTENCE_END.search(text)
    if end is None:
        return None
    sentence = text[: end.end()]
    if "\n" in sentence or sentence[0] in "#*-|>`" or len(sentence.split()) < MIN_WORDS:
        return None
    return sentence


def is_one_sentence(text: str) -> bool:
    """Whether ``text`` is exactly one plain sentence: the behaviour the exercise checks."""
    sentence = first_sentence(text)
    return sentence is not None and sentence == text.strip()


def whole_sentences(text: str) -> str:
    """The text up to the end of its last whole sentence (a generation cut at its token cap stops
    mid-sentence); the text itself when it has no sentence end."""
    ends = [match.end() for match in _SENTENCE_END.finditer(text)]
    return text[: ends[-1]] if ends else text
