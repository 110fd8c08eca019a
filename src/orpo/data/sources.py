"""Load preference rows from wherever they live, remembering where each row came from.

A source is a path (``.jsonl``, ``.json``, ``.csv``, ``.parquet``, a ``Dataset.save_to_disk``
directory, or a directory of such files), a hub dataset name, an in-memory ``datasets.Dataset``
/ ``DatasetDict``, or ``demo:train`` / ``demo:test`` (the shipped quickstart data). Every row keeps its origin (``file:line`` for JSONL, ``file:row`` for CSV and
Parquet), so later validation errors can point at it. Reading errors (bad JSON, non-UTF-8 bytes)
name the file, the line and the byte offset.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from orpo import defaults
from orpo.errors import OrpoError
from orpo.hub import explain_failure, offline_reason

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
MAX_PROBLEMS_SHOWN = 10


@dataclass
class LoadedSource:
    """Rows of one source and, per row, where it came from (``"file.jsonl:12"``).

    ``rows`` is a list of dicts for JSON/JSONL/CSV files (validated before any schema is imposed,
    so a wrongly typed field is a row problem, not a pyarrow error) or a ``datasets.Dataset``.
    """

    name: str
    rows: list[dict] | Dataset
    origins: list[str]

    @property
    def columns(self) -> list[str]:
        if isinstance(self.rows, Dataset):
            return list(self.rows.column_names)
        names: dict[str, None] = {}
        for row in self.rows:
            names.update(dict.fromkeys(row))
        return list(names)


def _read_jsonl(path: Path) -> tuple[list[dict], list[str]]:
    rows, origins, problems = [], [], []
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            start = offset
            offset += len(raw)
            try:
                # utf-8-sig: a byte-order mark at the start (Windows editors write one) is not part of the JSON
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                problems.append(f"{path}:{number}: not UTF-8 (byte offset {start + err.start} in the file)")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                problems.append(f"{path}:{number}: bad JSON at column {err.colno}: {err.msg}")
                continue
            except RecursionError:
                problems.append(f"{path}:{number}: JSON nested too deeply to read")
                continue
            if not isinstance(row, dict):
                problems.append(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
                continue
            rows.append(row)
            origins.append(f"{path}:{number}")
    _raise_problems(problems)
    return rows, origins


def _read_json(path: Path) -> tuple[list[dict], list[str]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise OrpoError(f"{path}: not UTF-8 (byte offset {err.start})") from err
    except json.JSONDecodeError as err:
        raise OrpoError(f"{path}:{err.lineno}: bad JSON at column {err.colno}: {err.msg}") from err
    except RecursionError:
        raise OrpoError(f"{path}: JSON nested too deeply to read") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise OrpoError(f'{path}: expected a list of rows or {{"data": [...]}}, got {type(data).__name__}')
    bad = [i for i, row in enumerate(data) if not isinstance(row, dict)]
    if bad:
        raise OrpoError(
            f"{path}: rows {', '.join(str(i + 1) for i in bad[:MAX_PROBLEMS_SHOWN])} are not objects"
        )
    return data, [f"{path}: row {i + 1}" for i in range(len(data))]


def _read_csv(path: Path) -> tuple[list[dict], list[str]]:
    rows, origins = [], []
    # Long answers are normal; the csv module's default stops at 128 KiB. Its limit is global: restored after.
    limit = csv.field_size_limit(2**31 - 1)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # Excel starts its CSV with a byte-order mark
            reader = csv.DictReader(f)
            start = None
            for row in reader:
                # line_num counts physical lines read so far; a quoted field may span several.
                first_line = (start or 1) + 1
                rows.append(dict(row))
                origins.append(f"{path}:{first_line}")
                start = reader.line_num
    except UnicodeDecodeError as err:
        raise OrpoError(f"{path}: not UTF-8 (byte offset {err.start})") from err
    finally:
        csv.field_size_limit(limit)
    return rows, origins


def _read_file(path: Path) -> LoadedSource:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            dataset = Dataset.from_parquet(str(path))
        except Exception as err:  # noqa: BLE001 - pyarrow's errors for files that are not Parquet
            raise OrpoError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from err
        return LoadedSource(str(path), dataset, [f"{path}: row {i + 1}" for i in range(len(dataset))])
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv}.get(suffix)
    if reader is None:
        raise OrpoError(f"{path}: unsupported file type '{suffix}' (use {', '.join(FILE_SUFFIXES)})")
    rows, origins = reader(path)
    if not rows:
        raise OrpoError(f"{path}: no rows")
    return LoadedSource(str(path), rows, origins)


def list_problems(problems: list[str]) -> str:
    """The first ``MAX_PROBLEMS_SHOWN`` problems, one per indented line, and how many more there are."""
    shown = "\n  ".join(problems[:MAX_PROBLEMS_SHOWN])
    hidden = len(problems) - MAX_PROBLEMS_SHOWN
    return f"  {shown}" + (f"\n  ... and {hidden} more" if hidden > 0 else "")


def _raise_problems(problems: list[str]) -> None:
    if problems:
        raise OrpoError(f"{len(problems)} problem(s) reading the data:\n{list_problems(problems)}")


# Shipped JSONL data by its ``demo:NAME``: the tiny model's quickstart pairs, and the real-model exercise's
# (SmolLM2 learns one-sentence answers; built by scripts/build_smollm2_data.py).
DEMO_DATA = {
    "train": "train.jsonl",
    "test": "test.jsonl",
    "smollm2-train": "smollm2/train.jsonl",
    "smollm2-test": "smollm2/test.jsonl",
    "smollm2-unrelated": "smollm2/unrelated.jsonl",
}


def demo_data_path(split: str) -> Path:
    """Path of the shipped JSONL data called ``demo:SPLIT`` (:data:`DEMO_DATA`)."""
    if split not in DEMO_DATA:
        names = ", ".join(f"demo:{name}" for name in DEMO_DATA)
        raise OrpoError(f"demo:{split}: the shipped data is {names}")
    return defaults.DEMO_DIR / DEMO_DATA[split]


def load_demo_dataset(split: str = "train") -> Dataset:
    """The shipped preference data as a ``datasets.Dataset`` (prompt / chosen / rejected)."""
    with demo_data_path(split).open(encoding="utf-8") as f:
        return Dataset.from_list([json.loads(line) for line in f])


def load_source(source, split: str = "train", subset: str | None = None) -> LoadedSource:
    """Load one source (see the module docstring); ``split``/``subset`` pick from hub datasets and
    ``DatasetDict``s."""
    if isinstance(source, DatasetDict):
        if split not in source:
            raise OrpoError(f"DatasetDict has splits {sorted(source)}, not '{split}'")
        source = source[split]
    if isinstance(source, Dataset):
        return LoadedSource("dataset", source, [f"dataset row {i + 1}" for i in range(len(source))])
    if isinstance(source, str) and source.startswith("demo:"):
        source = demo_data_path(source.split(":", 1)[1])  # the shipped data
    path = Path(str(source)).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            try:
                saved = load_from_disk(str(path))
            except Exception as err:  # noqa: BLE001 - missing or damaged .arrow files, bad metadata
                raise OrpoError(
                    f"{path}: a save_to_disk folder that cannot be read ({type(err).__name__}: {err}); save it again"
                ) from err
            loaded = load_source(saved, split=split)  # its rows named by this folder, not "dataset row N"
            return LoadedSource(
                str(path), loaded.rows, [f"{path}: row {i + 1}" for i in range(len(loaded.rows))]
            )
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_SUFFIXES)
        if not files:
            raise OrpoError(f"{path}: no {', '.join(FILE_SUFFIXES)} files and not a save_to_disk directory")
        parts = [_read_file(p) for p in files]
        rows = [dict(row) for part in parts for row in part.rows]
        return LoadedSource(str(path), rows, [o for part in parts for o in part.origins])
    if path.suffix.lower() in FILE_SUFFIXES or str(source).startswith((".", "/", "~")):
        raise OrpoError(f"{source}: no such file or directory")
    return _load_hub(str(source), split, subset)


def _load_hub(name: str, split: str, subset: str | None) -> LoadedSource:
    offline_reason()  # one quick probe before the first hub request, not a minute of retries
    try:
        dataset = load_dataset(name, subset, split=split)
    except Exception as err:  # network, missing dataset or split: all user-facing
        message = explain_failure(name, "the dataset", "a local file or folder")
        raise OrpoError(
            message or f"could not load hub dataset '{name}' (subset={subset}, split={split}): {err}"
        ) from err
    return LoadedSource(
        f"{name}[{split}]", dataset, [f"{name}[{split}] row {i + 1}" for i in range(len(dataset))]
    )
