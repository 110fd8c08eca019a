"""Preference rows -> token ids: render, tokenize, truncate, and report what was cut or dropped.

A row is ``{"prompt", "chosen", "rejected"}``, either plain strings (standard format) or lists
of ``{"role", "content"}`` messages (conversational format, rendered with the tokenizer's chat
template; the prompt gets the generation prompt). Output rows hold ``prompt_input_ids``,
``chosen_input_ids`` and ``rejected_input_ids``: the prompt once, the two responses separately,
so any batch layout (padded pairs, packing, prefix sharing) can be built from them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset
from datasets.fingerprint import Hasher

from orpo import __version__, defaults
from orpo.data.formats import RowProblem, normalize_row
from orpo.errors import OrpoError

logger = logging.getLogger("orpo")

TOKENIZED_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
ROW_INDEX = "row_index"  # the row's index in the dataset before tokenization, for error messages
CACHE_FORMAT = 3  # bump when the tokenized layout or the rules above change


@dataclass
class TruncationLimits:
    """Token budgets; None means unlimited. The defaults are ORPOConfig's (an unset prompt limit there is
    half of ``max_length``: :func:`orpo.defaults.prompt_limit`)."""

    max_length: int | None = defaults.MAX_LENGTH
    max_prompt_length: int | None = defaults.prompt_limit(defaults.MAX_LENGTH, None)
    max_completion_length: int | None = None


@dataclass
class TokenizeReport:
    """What tokenization changed, so nothing is lost silently."""

    source: str
    rows_in: int = 0
    chat_template: bool | None = None  # whether the chat template rendered the rows; None if pre-tokenized
    prompts_truncated: int = 0
    identical_pairs: int = 0
    responses_truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def rows_out(self) -> int:
        return self.rows_in - sum(self.dropped.values())

    def summary(self) -> str:
        parts = [f"{self.source}: {self.rows_out} of {self.rows_in} rows kept"]
        if self.identical_pairs:
            parts.append(
                f"{self.identical_pairs} rows have identical chosen and rejected tokens (kept; they carry no "
                "preference signal, only NLL)"
            )
        if self.prompts_truncated:
            parts.append(f"{self.prompts_truncated} prompts truncated (kept their end)")
        if self.responses_truncated:
            parts.append(f"{self.responses_truncated} rows with a response truncated (kept its start)")
        for reason, count in self.dropped.items():
            parts.append(f"{count} rows dropped: {reason}")
        return "; ".join(parts)


class PairTokenizer:
    """Turns one preference row into prompt / chosen / rejected token ids.

    Standard rows: the prompt is tokenized as is (BOS prepended when the tokenizer normally adds
    one) and EOS is appended to each response unless it already ends with it. Conversational
    rows: the chat template renders the prompt with the generation prompt, and each response is
    what the template adds after it; EOS is appended only if the template put none there. BOS is
    never doubled. An empty prompt becomes ``[BOS]`` (or ``[EOS]`` if there is no BOS), so the
    first response token has a context to be predicted from.
    """

    def __init__(self, tokenizer, source: str = "dataset", limits: TruncationLimits | None = None):
        self.tokenizer = tokenizer
        self.source = source
        self.char_caps = character_caps(tokenizer, limits) if limits is not None else (None, None)
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id
        if self.eos_id is None:
            raise OrpoError("the tokenizer has no eos_token; set one (responses must end with EOS)")
        probe = tokenizer("a").input_ids
        self.adds_bos = self.bos_id is not None and len(probe) > 0 and probe[0] == self.bos_id

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _dedupe_bos(self, ids: list[int]) -> list[int]:
        while self.bos_id is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos_id:
            ids = ids[1:]
        return ids

    def _template(self, messages: list, index: int, **options) -> str:
        """The chat template's rendering of ``messages``; a template that fails (or that the Jinja sandbox
        refuses: a template reaching for Python internals) is one error naming the row, not a traceback."""
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, **options)
        except Exception as err:
            # The sandbox's refusal can surface as the error it caused (an AttributeError on what it hid).
            cause = err if isinstance(err, TemplateError) else err.__context__
            if not isinstance(cause, TemplateError):
                raise
            raise OrpoError(
                f"{self.source}, row {index + 1}: the tokenizer's chat template failed "
                f"({type(cause).__name__}: {cause}); fix or replace the template (chat_template in the config)"
            ) from None

    def _render_conversation(self, row: dict, index: int) -> tuple[str, str, str]:
        if getattr(self.tokenizer, "chat_template", None) is None:
            raise OrpoError(
                f"{self.source}, row {index + 1}: conversational rows need a tokenizer with a chat "
                "template; add `chat_template: chatml` (or a Jinja template or file) to the config, set "
                "tokenizer.chat_template in Python, or use a chat model's tokenizer"
            )
        prompt = self._template(row["prompt"], index, add_generation_prompt=True)
        responses = []
        for name in ("chosen", "rejected"):
            full = self._template(row["prompt"] + row[name], index)
            if not full.startswith(prompt):
                raise OrpoError(
                    f"{self.source}, row {index + 1}: the chat template does not render the prompt as a "
                    f"prefix of prompt + {name}; cannot tell where the response starts"
                )
            responses.append(full[len(prompt) :])
        return prompt, responses[0], responses[1]

    def __call__(self, row: dict, index: int) -> dict[str, list[int]]:
        # The one row checker (orpo.data.formats); rows from read_pairs pass it unchanged.
        fmt = "conversational" if isinstance(row.get("prompt"), list) else "standard"
        try:
            row = normalize_row(row, fmt)
        except RowProblem as problem:
            raise OrpoError(f"{self.source}, row {index + 1}: {problem}") from None
        row = cap_characters(row, *self.char_caps)
        if fmt == "conversational":
            prompt, chosen, rejected = self._render_conversation(row, index)
            prompt_ids = self._dedupe_bos(self._ids(prompt))
            responses = [self._ids(chosen), self._ids(rejected)]
            responses = [ids if self.eos_id in ids else ids + [self.eos_id] for ids in responses]
        else:
            prompt_ids = self._ids(row["prompt"])
            if self.adds_bos and (not prompt_ids or prompt_ids[0] != self.bos_id):
                prompt_ids = [self.bos_id] + prompt_ids
            prompt_ids = self._dedupe_bos(prompt_ids)
            responses = [self._ids(row["chosen"]), self._ids(row["rejected"])]
            responses = [ids if ids and ids[-1] == self.eos_id else ids + [self.eos_id] for ids in responses]
        if not prompt_ids:
            # The first response token needs a context to be predicted from.
            prompt_ids = [self.bos_id if self.bos_id is not None else self.eos_id]
        return {
            "prompt_input_ids": prompt_ids,
            "chosen_input_ids": responses[0],
            "rejected_input_ids": responses[1],
        }


def character_caps(tokenizer, limits: TruncationLimits) -> tuple[int | None, int | None]:
    """(prompt, response) character caps that token truncation makes harmless: a text longer than the cap
    has more tokens than the limit (no token spells more characters than the vocabulary's longest), so
    cutting it there first keeps every token truncation keeps, while tokenizing a 50 MB answer no longer
    needs gigabytes. A margin of 64 tokens leaves the word at the cut apart from the tokens kept."""
    prompt_limit = limits.max_prompt_length or limits.max_length
    response_limit = min(
        (n for n in (limits.max_completion_length, limits.max_length) if n is not None), default=None
    )
    if prompt_limit is None and response_limit is None:
        return None, None
    longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
    return tuple(None if n is None else (n + 64) * max(longest, 1) for n in (prompt_limit, response_limit))


def cap_characters(row: dict, prompt_cap: int | None, response_cap: int | None) -> dict:
    """The row with texts over the caps cut (:func:`character_caps`): prompts keep their end, responses their
    start, as token truncation does; in conversations, each message's content."""

    def cut(text, cap, keep_end):
        if cap is None or not isinstance(text, str) or len(text) <= cap:
            return text
        return text[-cap:] if keep_end else text[:cap]

    def cut_value(value, cap, keep_end):
        if isinstance(value, list):
            return [{**m, "content": cut(m.get("content"), cap, keep_end)} for m in value]
        return cut(value, cap, keep_end)

    return {
        **row,
        "prompt": cut_value(row["prompt"], prompt_cap, keep_end=True),
        "chosen": cut_value(row["chosen"], response_cap, keep_end=False),
        "rejected": cut_value(row["rejected"], response_cap, keep_end=False),
    }


def truncate_pair(
    prompt: list[int], chosen: list[int], rejected: list[int], limits: TruncationLimits, bos_id: int | None
) -> tuple[list[int], list[int], list[int]]:
    """Prompt keeps its end (and its BOS), responses keep their start; prompt + longer response
    fits ``max_length``. A response may come out empty: the caller drops such rows."""
    if limits.max_prompt_length is not None and len(prompt) > limits.max_prompt_length:
        keep = limits.max_prompt_length
        if bos_id is not None and prompt and prompt[0] == bos_id and keep > 1:
            prompt = [bos_id] + prompt[len(prompt) - keep + 1 :]
        else:
            prompt = prompt[len(prompt) - keep :]
    if limits.max_completion_length is not None:
        chosen = chosen[: limits.max_completion_length]
        rejected = rejected[: limits.max_completion_length]
    if limits.max_length is not None:
        budget = max(limits.max_length - len(prompt), 0)
        chosen, rejected = chosen[:budget], rejected[:budget]
    return prompt, chosen, rejected


default_cache_dir = defaults.cache_dir  # where tokenized datasets are cached


def tokenization_key(dataset: Dataset, tokenizer, limits: TruncationLimits) -> str:
    """A content hash of rows, tokenizer (vocabulary, template, special tokens) and limits: the same
    data tokenized the same way gets the same key, whatever object it came from."""
    digest = hashlib.sha256()
    for batch in dataset.data.table.to_batches():
        digest.update(memoryview(batch.serialize()))
    digest.update(Hasher.hash(tokenizer).encode())
    digest.update(repr((limits, __version__, CACHE_FORMAT)).encode())
    return digest.hexdigest()[:32]


def rows_fingerprint(dataset) -> str | None:
    """A content hash of a tokenized dataset's rows (its token columns, in order): the same rows give the same
    hash wherever they were read from, and rows edited in place another. None for a streamed dataset."""
    if not isinstance(dataset, Dataset) or not all(c in dataset.column_names for c in TOKENIZED_COLUMNS):
        return None
    digest = hashlib.sha256()
    for batch in dataset.select_columns(list(TOKENIZED_COLUMNS)).flatten_indices().data.table.to_batches():
        digest.update(memoryview(batch.serialize()))
    return digest.hexdigest()[:32]


def _cache_problem(cache_dir, err: OSError) -> str:
    return (
        f"the tokenization cache {cache_dir} cannot be used ({err.strerror or err}; set ORPO_CACHE_DIR to a "
        "writable folder)"
    )


def _usable_cache_file(cache_dir, dataset, tokenizer, limits) -> str | None:
    """The cache file for these rows, or None (with a warning saying why) when the cache folder cannot be made
    or written: a file where the folder should be, a read-only disk. Training does not need the cache."""
    if cache_dir is None:
        return None
    folder = Path(cache_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(13, "not writable")
    except OSError as err:
        logger.warning(f"{_cache_problem(cache_dir, err)}; tokenizing without it")
        return None
    return str(folder / f"{tokenization_key(dataset, tokenizer, limits)}.arrow")


def tokenize_dataset(
    dataset: Dataset,
    tokenizer,
    limits: TruncationLimits,
    *,
    source: str = "dataset",
    num_proc: int | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Dataset, TokenizeReport]:
    """Tokenize and truncate a preference dataset; drop rows with no response token left.

    Returns the dataset with only ``TOKENIZED_COLUMNS`` and a :class:`TokenizeReport`; the
    report's summary is logged as a warning whenever anything was truncated or dropped. With
    ``cache_dir``, the result is cached under a content hash (:func:`tokenization_key`), so the
    second run on the same data and tokenizer skips tokenization.
    """
    pair_tokenizer = PairTokenizer(tokenizer, source, limits)
    bos_id = tokenizer.bos_token_id

    def encode(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = {
            name: [] for name in (*TOKENIZED_COLUMNS, ROW_INDEX, "_prompt_truncated", "_response_truncated")
        }
        for k, index in enumerate(indices):
            ids = pair_tokenizer({name: values[k] for name, values in batch.items()}, index)
            prompt, chosen, rejected = (ids[name] for name in TOKENIZED_COLUMNS)
            new_prompt, new_chosen, new_rejected = truncate_pair(prompt, chosen, rejected, limits, bos_id)
            out["prompt_input_ids"].append(new_prompt)
            out["chosen_input_ids"].append(new_chosen)
            out["rejected_input_ids"].append(new_rejected)
            out[ROW_INDEX].append(index)
            out["_prompt_truncated"].append(len(new_prompt) < len(prompt))
            out["_response_truncated"].append(
                len(new_chosen) < len(chosen) or len(new_rejected) < len(rejected)
            )
        return out

    report = TokenizeReport(source=source, rows_in=len(dataset))
    cache_file = _usable_cache_file(cache_dir, dataset, tokenizer, limits)

    def tokenize(cache_file):
        return dataset.map(
            encode,
            batched=True,
            with_indices=True,
            remove_columns=dataset.column_names,
            num_proc=num_proc,
            desc=f"Tokenizing {source}",
            cache_file_name=cache_file,
            load_from_cache_file=cache_file is not None,
        )

    try:
        encoded = tokenize(cache_file)
    except OSError as err:  # the cache filled the disk, or vanished, while writing: tokenize in memory
        if cache_file is None:
            raise
        logger.warning(f"{_cache_problem(cache_dir, err)}; tokenizing without the cache")
        encoded = tokenize(None)
    report.prompts_truncated = sum(encoded["_prompt_truncated"])
    report.responses_truncated = sum(encoded["_response_truncated"])
    chosen, rejected = encoded["chosen_input_ids"], encoded["rejected_input_ids"]
    empty = {i for i, (c, r) in enumerate(zip(chosen, rejected, strict=True)) if not c or not r}
    # Among the rows kept: a row with no response token left is dropped, not an identical pair.
    report.identical_pairs = sum(
        c == r for i, (c, r) in enumerate(zip(chosen, rejected, strict=True)) if i not in empty
    )
    if empty:
        report.dropped["the prompt fills max_length, no response token fits"] = len(empty)
        if len(empty) == len(encoded):
            longest = max(len(ids) for ids in encoded["prompt_input_ids"])
            raise OrpoError(
                f"{source}: no response token fits in any of the {len(encoded)} rows: max_length "
                f"{limits.max_length} is used up by the prompts (up to {longest} tokens after max_prompt_length "
                f"{limits.max_prompt_length}); a max_length of at least {longest + 1} keeps every row, or lower "
                "max_prompt_length"
            )
        encoded = encoded.select([i for i in range(len(encoded)) if i not in empty])
    encoded = encoded.remove_columns(["_prompt_truncated", "_response_truncated"])
    if report.prompts_truncated or report.responses_truncated or report.dropped or report.identical_pairs:
        logger.warning(report.summary())
    return encoded, report


def split_off_eval(dataset: Dataset, size: float, seed: int) -> tuple[Dataset, Dataset]:
    """``(train, held_out)``: a seeded random ``size`` of the pairs held out, a fraction below 1 or a
    number of pairs from 1. Rows keep their ``row_index``, so messages still name the source rows."""
    count = round(size * len(dataset)) if size < 1 else int(size)
    if not 1 <= count < len(dataset):
        raise OrpoError(
            f"val_set_size {size:g} holds out {count} of {len(dataset)} training pairs; it must leave at "
            "least one pair on each side"
        )
    parts = dataset.train_test_split(test_size=count, seed=seed, shuffle=True)
    return parts["train"], parts["test"]
