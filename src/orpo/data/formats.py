"""Detect a preference dataset's format and normalise every row to prompt / chosen / rejected.

Formats (TRL's conventions, so hub preference sets load as they are):

- ``standard``: ``prompt``, ``chosen``, ``rejected`` strings;
- ``conversational``: ``prompt`` a list of ``{"role", "content"}`` messages (or ShareGPT's
  ``{"from", "value"}``, with its sender names: human, gpt, ...), ``chosen`` /
  ``rejected`` the assistant message(s) that follow; also ``prompt`` a string with ``chosen`` /
  ``rejected`` whole conversations (UltraFeedback-binarized, orpo-dpo-mix-40k), and a ``system``
  column (Intel/orca_dpo_pairs), which becomes a system message;
- ``implicit``: only ``chosen`` / ``rejected``; the prompt is their longest common prefix, cut at
  the last assistant turn (strings like Anthropic HH's "\\n\\nHuman: … \\n\\nAssistant: …", or
  message lists).

Other column names map onto these with ``columns={"prompt": "question", ...}``. Problems are
collected per row with the row's origin (``file:line``) and reported together.
"""

from __future__ import annotations

import logging
from collections import Counter

from datasets import Dataset

from orpo import defaults
from orpo.data.sources import LoadedSource, list_problems
from orpo.errors import OrpoError

logger = logging.getLogger("orpo")

FORMATS = defaults.FORMATS
ROLES = ("system", "user", "assistant", "tool")
# Where an assistant turn starts in plain-text transcripts; the prompt ends after the last one.
ASSISTANT_MARKERS = ("\n\nAssistant:", "Assistant:", "<|im_start|>assistant\n", "[/INST]", "### Response:")
PROMPT_ALIASES = ("question",)
# ShareGPT-style messages (``{"from": "human", "value": ...}``, common in Axolotl datasets): sender -> role.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


class RowProblem(Exception):
    """One row's problem; the message names the field and what was expected."""


def _message(message, field: str, k: int) -> dict:
    """One message as ``{"role", "content"}``, from that form or ShareGPT's ``{"from", "value"}``."""
    if not isinstance(message, dict):
        raise RowProblem(f"field '{field}' message {k} must be a mapping, got {type(message).__name__}")
    if message.get("role") is not None:
        role, content = message["role"], message.get("content")
        if role not in ROLES:
            raise RowProblem(
                f"field '{field}' message {k} has unknown role '{role}' (use {', '.join(ROLES)})"
            )
    elif message.get("from") is not None:
        role, content = SHAREGPT_ROLES.get(message["from"]), message.get("value")
        if role is None:
            raise RowProblem(
                f"field '{field}' message {k} has unknown sender 'from: {message['from']}' "
                f"(use {', '.join(SHAREGPT_ROLES)})"
            )
    else:
        raise RowProblem(
            f"field '{field}' message {k} needs 'role' and 'content' (or ShareGPT's 'from' and 'value')"
        )
    if not isinstance(content, str):
        raise RowProblem(f"field '{field}' message {k} content must be a string")
    _encodable(content, f"field '{field}' message {k}")
    return {"role": role, "content": content}


def _messages(value, field: str) -> list[dict]:
    if not isinstance(value, list):
        raise RowProblem(f"field '{field}' must be a list of messages, got {type(value).__name__}")
    return [_message(message, field, k) for k, message in enumerate(value, start=1)]


def _text(value, field: str, allow_empty: bool = False) -> str:
    if value is None:
        raise RowProblem(f"field '{field}' is null")
    if not isinstance(value, str):
        raise RowProblem(f"field '{field}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowProblem(f"field '{field}' is empty")
    _encodable(value, f"field '{field}'")
    return value


def _encodable(text: str, where: str) -> None:
    """Text a tokenizer can take: JSON's "\\ud800"-style escapes can leave lone surrogates, which no UTF-8
    tokenizer encodes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowProblem(
            f"{where} holds a lone surrogate character ({text[err.start]!r} at character {err.start + 1}), "
            "which is not valid Unicode text"
        ) from None


def _check_roles(prompt: list[dict], responses: dict[str, list[dict]]) -> None:
    for k, message in enumerate(prompt):
        if message["role"] == "system" and k != 0:
            raise RowProblem(f"field 'prompt' message {k + 1}: a system message may only come first")
    if prompt and prompt[-1]["role"] == "assistant":
        raise RowProblem("field 'prompt' ends with an assistant message; the response must come next")
    for field, messages in responses.items():
        if not messages:
            raise RowProblem(f"field '{field}' has no messages")
        if messages[0]["role"] != "assistant":
            raise RowProblem(
                f"field '{field}' must start with an assistant message, got '{messages[0]['role']}'"
            )
        if not any(m["content"].strip() for m in messages):
            raise RowProblem(f"field '{field}' is empty")


def _common_prefix(chosen: list[dict], rejected: list[dict]) -> int:
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    return common


def _shared_turns(chosen: list[dict], rejected: list[dict]) -> int | None:
    """Where the responses start: the last index up to the leading messages ``chosen`` and ``rejected`` share
    at which both go on with an assistant turn (so a row that differs first in a user turn, or one side a
    prefix of the other, or both identical, still has an assistant turn on each side). None when there is
    no such index (e.g. one side holds the user turn and the other only its answer)."""
    common = _common_prefix(chosen, rejected)
    for k in range(min(common, len(chosen) - 1, len(rejected) - 1), -1, -1):
        if chosen[k]["role"] == "assistant" == rejected[k]["role"]:
            return k
    return None


def _split_conversations(
    prompt_text: str, chosen: list[dict], rejected: list[dict]
) -> tuple[list[dict], list[dict], list[dict]] | None:
    """A string prompt next to whole conversations (UltraFeedback-binarized, HH "trl-style", Capybara): the
    prompt is every turn the two conversations share (TRL's rule: the shared user *and* assistant turns of a
    multi-turn row are context, not response); the string becomes the first user turn only when the
    conversations start with an answer (they hold the responses alone). None when they have no common start."""
    k = _shared_turns(chosen, rejected)
    if k is None:
        return None
    shared = chosen[:k]
    systems = next((i for i, m in enumerate(shared) if m["role"] != "system"), len(shared))
    if systems == len(shared) or shared[systems]["role"] != "user":  # the conversations start with an answer
        shared = [*shared[:systems], {"role": "user", "content": prompt_text}, *shared[systems:]]
    return shared, chosen[k:], rejected[k:]


def _assistant_part(prompt_text: str, conversation: list[dict], field: str) -> list[dict]:
    """One whole conversation next to a string prompt and a string response on the other side: what comes
    from the first assistant turn on, if the prompt is among the turns before it (else all of it)."""
    k = next((i for i, m in enumerate(conversation) if m["role"] == "assistant"), None)
    if k is None:
        raise RowProblem(f"field '{field}' has no assistant message")
    if not any(m["content"] == prompt_text for m in conversation[:k]):
        return conversation
    return conversation[k:]


# How an implicit-prompt text row was split into prompt and responses (orpo check-data counts them).
SPLIT_AT_MARKER = "at the last assistant marker"
SPLIT_AT_PREFIX = "at the longest common prefix (TRL's extract_prompt)"


def _implicit_text(chosen: str, rejected: str) -> tuple[str, str, str, str]:
    """``(prompt, chosen, rejected, rule)``. The prompt is what both share, cut at the last assistant marker
    in it (Anthropic HH's "\n\nAssistant:", ChatML, [/INST], ...), so the response is the whole assistant
    turn; without a marker, TRL's rule: the longest common prefix, a space before the first difference
    going to the responses."""
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    shared = chosen[:common]
    ends = [shared.rfind(marker) + len(marker) for marker in ASSISTANT_MARKERS if marker in shared]
    if ends:
        end, rule = max(ends), SPLIT_AT_MARKER
    else:
        end, rule = common, SPLIT_AT_PREFIX
        if 0 < end < len(chosen) and chosen[end - 1] == " ":
            end -= 1
    return chosen[:end], chosen[end:], rejected[end:], rule


def _implicit_messages(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    k = _shared_turns(chosen, rejected)
    if k is None:  # no common start followed by an assistant turn: the role checks say what is wrong
        k = _common_prefix(chosen, rejected)
    return chosen[:k], chosen[k:], rejected[k:]


# How to map columns, spelled for every place a user can be.
COLUMNS_HELP = (
    "map yours with --columns prompt=COL,chosen=COL,rejected=COL (orpo train / check-data), "
    "'dataset_columns: {prompt: COL, chosen: COL, rejected: COL}' in a config file, or "
    "ORPOConfig(dataset_columns={...}) in Python"
)


def detect_format(
    columns: list[str], first_row: dict, source: str = "the data", found: list | None = None
) -> str:
    """``standard``, ``conversational`` or ``implicit`` from the (mapped) columns and one row; ``found`` are the
    source's own column names, for the message."""
    if "chosen" not in columns or "rejected" not in columns:
        raise OrpoError(
            f"{source} needs 'chosen' and 'rejected' columns; its columns are {found or columns}; {COLUMNS_HELP}"
        )
    if "prompt" not in columns:
        return "implicit"
    if isinstance(first_row.get("prompt"), list) or isinstance(first_row.get("chosen"), list):
        return "conversational"
    if "system" in columns:
        return "conversational"
    return "standard"


def normalize_row(row: dict, fmt: str, splits: Counter | None = None) -> dict:
    """One row as ``{"prompt", "chosen", "rejected"}`` in ``fmt``; raises :class:`RowProblem`. An implicit
    text row adds the rule that split it to ``splits``."""
    if fmt == "implicit":
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if isinstance(chosen, list) or isinstance(rejected, list):
            chosen, rejected = _messages(chosen, "chosen"), _messages(rejected, "rejected")
            prompt, chosen, rejected = _implicit_messages(chosen, rejected)
            _check_roles(prompt, {"chosen": chosen, "rejected": rejected})
        else:
            prompt, chosen, rejected, rule = _implicit_text(
                _text(chosen, "chosen"), _text(rejected, "rejected")
            )
            _text(chosen, "chosen")
            _text(rejected, "rejected")
            if splits is not None:
                splits[rule] += 1
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for field in ("prompt", "chosen", "rejected"):
        if field not in row or (row[field] is None and field != "prompt"):
            raise RowProblem(f"missing field '{field}' (absent or null)")
    if fmt == "standard":
        return {
            "prompt": _text(row["prompt"], "prompt", allow_empty=True),
            "chosen": _text(row["chosen"], "chosen"),
            "rejected": _text(row["rejected"], "rejected"),
        }
    responses = {}
    for field in ("chosen", "rejected"):
        value = row[field]
        if isinstance(value, str):
            responses[field] = [{"role": "assistant", "content": _text(value, field)}]
        else:
            responses[field] = _messages(value, field)
    if isinstance(row["prompt"], list):
        prompt = _messages(row["prompt"], "prompt")
    else:
        prompt_text = _text(row["prompt"], "prompt")
        prompt = [{"role": "user", "content": prompt_text}]
        split = None
        if all(isinstance(row[field], list) for field in ("chosen", "rejected")):
            # whole conversations next to a string prompt: the turns they share are the prompt
            split = _split_conversations(prompt_text, responses["chosen"], responses["rejected"])
        if split is not None:
            prompt, responses["chosen"], responses["rejected"] = split
        else:
            for field in ("chosen", "rejected"):
                if isinstance(row[field], list):
                    responses[field] = _assistant_part(prompt_text, responses[field], field)
    system = row.get("system")
    if isinstance(system, str) and system.strip() and not (prompt and prompt[0]["role"] == "system"):
        prompt = [{"role": "system", "content": system}] + prompt
    _check_roles(prompt, responses)
    return {"prompt": prompt, **responses}


def normalize_source(
    loaded: LoadedSource,
    fmt: str = "auto",
    columns: dict[str, str] | None = None,
    skip_invalid: bool = False,
    splits: Counter | None = None,
) -> tuple[Dataset, str, list[str]]:
    """Map columns, detect the format and normalise every row.

    Returns ``(dataset, format, skipped)``: the rows as prompt / chosen / rejected, the format, and
    the problems of rows dropped with ``skip_invalid`` (otherwise any problem raises an
    :class:`OrpoError` listing up to 10 of them with their origins).
    """
    present = loaded.columns
    renames = {}
    if columns:
        # A source that already uses the target name needs no mapping (e.g. an eval file in standard form),
        # and implicit-prompt data has no prompt column at all.
        missing = [
            src
            for dst, src in columns.items()
            if src not in present and dst not in present and dst != "prompt"
        ]
        if missing:
            raise OrpoError(f"{loaded.name}: column mapping names missing columns {missing}; found {present}")
        renames = {src: dst for dst, src in columns.items() if src != dst and src in present}
    if "prompt" not in present and "prompt" not in renames.values():
        alias = next((a for a in PROMPT_ALIASES if a in present), None)
        if alias is not None:
            renames[alias] = "prompt"
    mapped_columns = [renames.get(c, c) for c in present]
    if len(loaded.rows) == 0:
        raise OrpoError(f"{loaded.name}: no rows")
    first = {renames.get(k, k): v for k, v in loaded.rows[0].items()}
    if fmt == "auto":
        fmt = detect_format(mapped_columns, first, loaded.name, present)
    elif fmt not in FORMATS:
        raise OrpoError(f"unknown data format '{fmt}' (use auto, {', '.join(FORMATS)})")
    rows, problems = [], []
    for origin, row in zip(loaded.origins, loaded.rows, strict=True):
        try:
            normalized = normalize_row({renames.get(k, k): v for k, v in row.items()}, fmt, splits)
        except RowProblem as problem:
            problems.append(f"{origin}: {problem}")
            continue
        rows.append(normalized)
    if problems and not skip_invalid:
        raise OrpoError(
            f"{len(problems)} invalid row(s) in {loaded.name} ({fmt} format):\n{list_problems(problems)}\n"
            "fix them, or skip them with skip_invalid_rows=True (--skip-invalid)"
        )
    if problems:
        logger.warning(f"{loaded.name}: skipped {len(problems)} invalid row(s); first: {problems[0]}")
    if not rows:
        raise OrpoError(f"{loaded.name}: no valid rows")
    return Dataset.from_list(rows), fmt, problems
