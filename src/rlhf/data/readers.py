"""Read records from JSONL, JSON, Parquet, CSV, a saved ``datasets`` directory, or the hub.

Every record keeps where it came from (``file:line`` or ``file[row]``) so that a bad one
can be reported precisely. A hub dataset is read only when asked, as ``hf:NAME[:SPLIT]``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass

from rlhf import handles
from rlhf.errors import UserError


class DataError(UserError):
    """A data problem that stops the run; the message is one line naming where."""


@dataclass
class RecordError:
    """One bad record: where it is, which field, and what is wrong."""

    where: str
    field: str | None
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.problem}" if self.field else f"{self.where}: {self.problem}"


@dataclass
class Record:
    where: str
    data: dict


def _read_jsonl(path: str):
    records, errors = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not raw.strip():
                continue
            text, err = _decode_file(raw, path, first_line=lineno)
            if err:
                errors.append(err)
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                errors.append(RecordError(where, None, f"invalid JSON ({e.msg} at column {e.colno})"))
                continue
            if not isinstance(obj, dict):
                errors.append(RecordError(where, None, f"expected a JSON object, got {type(obj).__name__}"))
                continue
            records.append(Record(where, obj))
    return records, errors


def _decode_file(raw: bytes, path: str, first_line: int = 1) -> tuple[str | None, RecordError | None]:
    """UTF-8 text of ``raw`` (which starts at line ``first_line`` of ``path``), or where it breaks.

    A leading byte-order mark (Excel's and Notepad's "UTF-8 with BOM") is dropped.
    """
    try:
        return raw.decode("utf-8-sig" if first_line == 1 else "utf-8"), None
    except UnicodeDecodeError as e:
        line = first_line + raw[: e.start].count(b"\n")
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        return None, RecordError(f"{path}:{line}", None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column})")


def _read_json(path: str):
    with open(path, "rb") as f:
        text, err = _decode_file(f.read(), path)
    if err:
        return [], [err]
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return [], [RecordError(f"{path}:{e.lineno}", None, f"invalid JSON ({e.msg} at column {e.colno})")]
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        return [], [RecordError(path, None, "expected a JSON list of objects (or {\"data\": [...]})")]
    records, errors = [], []
    for i, item in enumerate(obj):
        where = f"{path}[{i}]"
        if isinstance(item, dict):
            records.append(Record(where, item))
        else:
            errors.append(RecordError(where, None, f"expected a JSON object, got {type(item).__name__}"))
    return records, errors


def _read_csv(path: str):
    with open(path, "rb") as f:
        text, err = _decode_file(f.read(), path)
    if err:
        return [], [err]
    reader = csv.DictReader(io.StringIO(text))
    records = []
    for row in reader:
        records.append(Record(f"{path}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}))
    return records, []


def _read_parquet(path: str):
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    return [Record(f"{path}[{i}]", row) for i, row in enumerate(rows)], []


def _from_dataset(ds, name: str):
    return [Record(f"{name}[{i}]", dict(row)) for i, row in enumerate(ds)], []


def _from_rows(rows, label: str):
    records, errors = [], []
    for i, row in enumerate(rows):
        if isinstance(row, dict):
            records.append(Record(f"{label}[{i}]", dict(row)))
        else:
            errors.append(RecordError(f"{label}[{i}]", None, f"expected a dict, got {type(row).__name__}"))
    return records, errors


def read_records(source: str) -> tuple[list[Record], list[RecordError]]:
    """All records of ``source`` plus the records that could not be read at all.

    ``source`` may be a handle of records handed in from Python (:mod:`rlhf.handles`): a list of
    dicts or a ``datasets.Dataset``, each record named ``LABEL[i]``.

    Raises:
        DataError: the source does not exist, has an unknown format, or holds no record.
    """
    rows = handles.lookup(source)
    if isinstance(rows, handles.Rows):
        records, errors = _from_rows(rows.rows, rows.label)
    elif source.startswith("hf:"):
        import datasets

        name, _, split = source[3:].partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except Exception as e:  # noqa: BLE001 - any hub failure is one user-facing line
            raise DataError(f"{source}: cannot load hub dataset ({str(e).splitlines()[0]})") from None
        records, errors = _from_dataset(ds, source)
    elif os.path.isdir(source):
        import datasets

        try:
            ds = datasets.load_from_disk(source)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{source}: not a saved datasets directory ({str(e).splitlines()[0]})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        records, errors = _from_dataset(ds, source)
    elif not os.path.exists(source):
        raise DataError(f"{source}: no such file")
    else:
        if os.path.getsize(source) == 0:
            raise DataError(f"{source}: empty file (no records)")
        ext = os.path.splitext(source)[1].lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
        if ext not in readers:
            raise DataError(f"{source}: unknown file type {ext or '(none)'}; use .jsonl, .json, .csv or .parquet")
        records, errors = readers[ext](source)
    if not records and not errors:
        raise DataError(f"{rows.label if isinstance(rows, handles.Rows) else source}: empty "
                        f"{'' if isinstance(rows, handles.Rows) else 'file '}(no records)")
    return records, errors
