"""Readers: JSONL, JSON, parquet, Hugging Face `datasets` folders and hub names -> list of dicts.

Every reader returns a `Records` list: a plain `list[dict]` that also remembers where it came
from (`source`) and the 1-based line of each record in that source (`lines`), so validators
further down can name the exact line of a bad record. For JSONL that is the line in the file;
for JSON arrays, parquet and `datasets` it is the 1-based row number.

Two common community layouts are converted as they are read (docs/data.md, "Community layouts"):
Alpaca (`instruction`, `input`, `output`) to `prompt` / `completion`, and ShareGPT
(`conversations` of `{"from", "value"}` turns) to `messages`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from rlhfkit.errors import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


class Records(list):
    """A list of record dicts plus their provenance (`source`, 1-based `lines`)."""

    def __init__(self, items: Iterable[dict] = (), source: str | None = None,
                 lines: Sequence[int] | None = None):
        super().__init__(items)
        self.source = source
        self.lines = list(lines) if lines is not None else None
        self.report = None  # set by validators: a ValidationReport

    def __getitem__(self, key):
        if isinstance(key, slice):  # slices keep their provenance, so errors still cite lines
            lines = self.lines[key] if self.lines is not None else list(range(len(self)))[key]
            return Records(super().__getitem__(key), source=self.source,
                           lines=lines if self.lines is not None else [i + 1 for i in lines])
        return super().__getitem__(key)

    def line_of(self, index: int) -> int:
        """1-based line (or row) of record `index` in its source."""
        if self.lines is not None and index < len(self.lines):
            return self.lines[index]
        return index + 1


def line_of(records: Sequence[dict], index: int) -> int:
    return records.line_of(index) if isinstance(records, Records) else index + 1


def source_of(records: Sequence[dict], source: str | None = None) -> str:
    """The name errors should cite: the given one, the list's own, else "<records>" (in-memory data)."""
    if source is not None:
        return str(source)
    if isinstance(records, Records) and records.source:
        return records.source
    return "<records>"


# ---------------------------------------------------------------- JSONL

def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Stream `(line_number, record)` from a JSONL file without loading it whole.

    Blank lines are skipped. A line that is not valid JSON, or is JSON but not an object,
    raises DataError naming the file and the line.
    """
    path = Path(path)
    with open(path, encoding="utf-8") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError(f"malformed JSON ({exc.msg} at column {exc.colno}); each line must be one "
                                f"JSON object", source=str(path), line=number) from None
            if not isinstance(value, dict):
                raise DataError(f"expected a JSON object, got {type(value).__name__}; each line must be "
                                f"one object such as {{\"prompt\": ..., \"completion\": ...}}",
                                source=str(path), line=number)
            yield number, value


def read_jsonl(path: str | os.PathLike) -> Records:
    lines, items = [], []
    for number, record in iter_jsonl(path):
        lines.append(number)
        items.append(record)
    return Records(items, source=str(path), lines=lines)


# ---------------------------------------------------------------- JSON

def read_json(path: str | os.PathLike) -> Records:
    """A JSON file holding a list of objects. A .json file that is really JSONL is read as JSONL."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # several top-level values: treat it as JSON Lines
            return read_jsonl(path)
        raise DataError(f"malformed JSON ({exc.msg} at column {exc.colno})", source=str(path),
                        line=exc.lineno) from None
    if not isinstance(value, list):
        raise DataError(f"expected a JSON list of objects at the top level, got {type(value).__name__}",
                        source=str(path))
    for i, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"expected a JSON object, got {type(item).__name__} (row numbers count list "
                            f"items)", source=str(path), line=i + 1)
    return Records(value, source=str(path))


# ---------------------------------------------------------------- parquet

def read_parquet(path: str | os.PathLike) -> Records:
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"cannot read parquet file: {exc}", source=str(path)) from None
    return Records(table.to_pylist(), source=str(path))


def iter_parquet(path: str | os.PathLike, batch_size: int = 1024) -> Iterator[tuple[int, dict]]:
    """Stream `(row_number, record)` from a parquet file, one row group batch at a time."""

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        for record in batch.to_pylist():
            row += 1
            yield row, record


# ---------------------------------------------------------------- Hugging Face datasets

def _is_saved_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").exists() or (folder / "state.json").exists()


def read_saved_dataset(folder: str | os.PathLike, split: str = "train") -> Records:
    """A folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk` (then `split` picks one)."""

    folder = Path(folder)
    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as exc:
        raise DataError(f"cannot load the saved dataset: {exc}", source=str(folder)) from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"split '{split}' not found; available splits: {sorted(loaded)}",
                            source=str(folder), field="split")
        loaded = loaded[split]
    return Records(loaded.to_list(), source=f"{folder} [{split}]")


def read_hub_dataset(name: str, split: str = "train") -> Records:
    """`datasets.load_dataset(name, split=split)`; network or lookup failures become a DataError."""

    try:
        loaded = datasets.load_dataset(name, split=split)
    except (ConnectionError, OSError) as exc:
        raise DataError(
            f"could not fetch dataset '{name}' from the Hugging Face Hub ({exc}). If you meant a local "
            f"file, check the path (accepted: {', '.join(FILE_SUFFIXES)} files, a `save_to_disk` folder, "
            f"or a folder holding {split}.jsonl / {split}.parquet); offline, download it elsewhere and "
            f"pass the saved folder.", source=name) from None
    except ValueError as exc:  # e.g. unknown split
        raise DataError(f"cannot load split '{split}' of hub dataset '{name}': {exc}", source=name,
                        field="split") from None
    if isinstance(loaded, datasets.DatasetDict):  # defensive: split=None style results
        loaded = loaded[split]
    return Records(loaded.to_list(), source=f"{name} [{split}]")


# ---------------------------------------------------------------- dispatch

_READERS = {".jsonl": read_jsonl, ".json": read_json, ".parquet": read_parquet}


def _read_folder(folder: Path, split: str) -> Records:
    if _is_saved_dataset(folder):
        return read_saved_dataset(folder, split)
    for suffix in FILE_SUFFIXES:  # a folder of split files: train.jsonl, eval.parquet, ...
        candidate = folder / f"{split}{suffix}"
        if candidate.exists():
            return _READERS[suffix](candidate)
    raise DataError(f"folder is neither a `save_to_disk` dataset nor holds {split}.jsonl / {split}.json / "
                    f"{split}.parquet", source=str(folder))


def _looks_like_path(source: str) -> bool:
    # hub names are "name" or "org/name"; anything else that does not exist is a missing file
    return (source.lower().endswith(FILE_SUFFIXES) or source.startswith((".", "/", "~"))
            or source.count("/") > 1 or "\\" in source)


def read_source(source: Any, split: str = "train") -> Records:
    """Dispatch on what `source` is: a file, a folder, a hub name, a Dataset or a list of dicts."""
    if isinstance(source, Records):
        return source
    if isinstance(source, list):
        for i, item in enumerate(source):
            if not isinstance(item, dict):
                raise DataError(f"expected a dict, got {type(item).__name__}", source="<records>", line=i + 1)
        return Records(source, source="<records>")
    if hasattr(source, "to_list") and hasattr(source, "column_names"):  # a datasets.Dataset
        return Records(source.to_list(), source="<dataset>")
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"cannot read data from a {type(source).__name__}; pass a path, a hub name, a "
                        f"datasets.Dataset or a list of dicts")
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_folder(path, split)
    if path.is_file():
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(f"unknown file type '{path.suffix}'; accepted: {', '.join(FILE_SUFFIXES)}",
                            source=str(path))
        return reader(path)
    text = str(source)
    if _looks_like_path(text):
        raise DataError("file not found", source=text)
    return read_hub_dataset(text, split)


EVAL_SPLITS = ("test", "eval", "validation")


def local_splits(source: Any) -> list[str]:
    """Split names a local folder offers (a `save_to_disk` DatasetDict or {split}.jsonl files); [] otherwise."""
    if not isinstance(source, (str, os.PathLike)):
        return []
    folder = Path(source).expanduser()
    if not folder.is_dir():
        return []
    manifest = folder / "dataset_dict.json"
    if manifest.is_file():
        return list(json.loads(manifest.read_text()).get("splits") or [])
    names = {p.stem for p in folder.iterdir() if p.suffix.lower() in FILE_SUFFIXES}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and _is_saved_dataset(p)}
    return sorted(names)


def eval_source(dataset: Any, eval_dataset: Any = "", eval_split: str = "") -> tuple[Any, str | None]:
    """(source, split) of held-out data, or (None, None).

    `eval_dataset` when given (its `eval_split`, default train); else `dataset`'s `eval_split`,
    or the first of test / eval / validation that a local `dataset` folder has (so a
    `save_to_disk` DatasetDict with train/test works without flags).
    """
    if eval_dataset:
        return eval_dataset, eval_split or "train"
    if eval_split:
        return dataset, eval_split
    found = [s for s in EVAL_SPLITS if s in local_splits(dataset)]
    return (dataset, found[0]) if found else (None, None)


# ---------------------------------------------------------------- community layouts

# ShareGPT speaker names (FastChat, LLaMA-Factory) -> chat roles; the role names themselves are accepted too
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "tool": "tool",
                  "user": "user", "assistant": "assistant"}
_OWN_COLUMNS = ("prompt", "completion", "messages", "chosen", "rejected")


def _string(record: dict, name: str, source: str | None, line: int, optional: bool = False) -> str:
    value = record.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"the Alpaca layout needs a string here, got {type(value).__name__}", source=source,
                        line=line, field=name)
    return value


def from_alpaca(record: dict, source: str | None = None, line: int = 0) -> dict:
    """Alpaca -> prompt/completion: prompt = instruction, followed by a blank line and the input when
    the input is not blank; completion = output. Other columns are kept."""
    instruction = _string(record, "instruction", source, line)
    extra = _string(record, "input", source, line, optional=True)
    output = _string(record, "output", source, line)
    rest = {k: v for k, v in record.items() if k not in ("instruction", "input", "output")}
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return {"prompt": prompt, "completion": output, **rest}


def from_sharegpt(record: dict, source: str | None = None, line: int = 0) -> dict:
    """ShareGPT -> messages: each turn {"from", "value"} becomes {"role", "content"} with human ->
    user, gpt -> assistant, system and tool unchanged; a `system` column becomes a first system
    message. Other columns are kept."""
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise DataError("ShareGPT 'conversations' must be a non-empty list of {\"from\", \"value\"} turns, "
                        f"got {type(turns).__name__}", source=source, line=line, field="conversations")
    messages = []
    system = record.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for k, turn in enumerate(turns):
        where = f"conversations[{k}]"
        if not isinstance(turn, dict):
            raise DataError(f"expected a {{\"from\", \"value\"}} object, got {type(turn).__name__}", source=source,
                            line=line, field=where)
        speaker = turn.get("from", turn.get("role"))
        if speaker not in SHAREGPT_ROLES:
            raise DataError(f"unknown speaker {speaker!r}; expected one of human, gpt, system, tool (or user, "
                            f"assistant)", source=source, line=line, field=f"{where}.from")
        content = turn.get("value", turn.get("content"))
        if not isinstance(content, str):
            raise DataError(f"a turn's text must be a string, got {type(content).__name__}", source=source,
                            line=line, field=f"{where}.value")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": content})
    rest = {k: v for k, v in record.items() if k not in ("conversations", "system")}
    return {**rest, "messages": messages}


def community_layout(record: dict) -> str | None:
    """'alpaca' or 'sharegpt' when `record` is in that layout (and has none of rlhfkit's own text
    columns), else None."""
    if any(record.get(k) is not None for k in _OWN_COLUMNS):
        return None
    if record.get("conversations") is not None:
        return "sharegpt"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


_CONVERTERS = {"alpaca": from_alpaca, "sharegpt": from_sharegpt}


def convert_record(record: dict, source: str | None = None, line: int = 0) -> dict:
    layout = community_layout(record) if isinstance(record, dict) else None
    return _CONVERTERS[layout](record, source, line) if layout else record


def convert_layouts(records: Records) -> Records:
    """`records` with Alpaca and ShareGPT records converted (provenance kept)."""
    if not any(isinstance(r, dict) and community_layout(r) for r in records):
        return records
    return Records([convert_record(r, records.source, records.line_of(i)) for i, r in enumerate(records)],
                   source=records.source, lines=[records.line_of(i) for i in range(len(records))])


def check_required(records: Records, required: Iterable[str]) -> None:
    """Every record must have each `required` column, and not as null."""
    required = list(required)
    for i, record in enumerate(records):
        for name in required:
            if record.get(name) is None:
                present = ", ".join(sorted(record)) or "none"
                raise DataError(f"missing required column (columns present: {present})",
                                source=records.source, line=records.line_of(i), field=name)


def load_records(source: Any, split: str = "train", required: Iterable[str] | None = None) -> Records:
    """Read `source` into a list of dicts.

    `source` is a .jsonl / .json / .parquet file, a folder written by `save_to_disk` (a
    DatasetDict picks `split`), a folder holding `{split}.jsonl|.json|.parquet`, a Hugging Face
    hub dataset name, a `datasets.Dataset` or a list of dicts. Alpaca and ShareGPT records are
    converted (:func:`convert_record`). `required` lists columns every record must have; a record
    without one raises DataError naming the file, line and field.
    """
    records = convert_layouts(read_source(source, split))
    if required:
        check_required(records, required)
    return records


def iter_records(source: str | os.PathLike, required: Iterable[str] | None = None) -> Iterator[dict]:
    """Stream records from a large JSONL or parquet file with constant memory.

    Each record is checked for `required` columns as it is read, so an error still names the line.
    """
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        stream = iter_jsonl(path)
    elif suffix == ".parquet":
        stream = iter_parquet(path)
    else:
        raise DataError("streaming reads .jsonl and .parquet files; use load_records for other sources",
                        source=str(path))
    required = list(required or ())
    for number, record in stream:
        record = convert_record(record, str(path), number)
        for name in required:
            if record.get(name) is None:
                raise DataError("missing required column", source=str(path), line=number, field=name)
        yield record
