"""Episode jobs and the append-only JSON Lines results file they are written to.

Layout of a results file::

    {"kind": "header", "suite": ..., "thrifty_version": ..., "meta": {...}, "created": ...}
    {"kind": "episode", "suite": ..., "config": ..., "level": ..., "seed": ..., "episode": ..., <result fields>}
    ...

Every episode line is written, flushed and fsync'ed on its own, so an interrupted
run loses at most the line being written. Such a truncated last line is ignored
(with a warning) when the file is read and cut off before the next append.
A single process is expected to write a given file at a time.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Job",
    "ResultsFile",
    "ResultsMismatchError",
    "ResultsCorruptError",
    "ResultsFileWarning",
    "IDENTITY_FIELDS",
]

#: Fields that identify an episode line; result dicts may not redefine them.
IDENTITY_FIELDS = ("kind", "suite", "config", "level", "seed", "episode")


@dataclass(frozen=True)
class Job:
    """One episode to run: configuration ``config`` on ``level`` with ``seed``."""

    suite: str
    config: str
    level: str
    seed: int
    episode: int

    @property
    def key(self) -> tuple[str, str, int]:
        """``(config, level, seed)``: what identifies a finished episode in a results file."""
        return (self.config, self.level, self.seed)


class ResultsMismatchError(ValueError):
    """The results file belongs to another suite."""


class ResultsCorruptError(ValueError):
    """The results file is damaged somewhere other than its last line, or is not a results file."""


class ResultsFileWarning(UserWarning):
    """A truncated or garbled last line was ignored."""


def _json_default(obj: Any) -> Any:
    # numpy / torch scalars and arrays, sets and tuples-like containers.
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"result value of type {type(obj).__name__} is not JSON serializable: {obj!r}")


def _dumps(record: Mapping[str, Any]) -> str:
    return json.dumps(record, default=_json_default, ensure_ascii=True)


def _thrifty_version() -> str:
    try:
        from thrifty import __version__

        return str(__version__)
    except Exception:  # pragma: no cover - only if the package is half-installed
        return "unknown"


def _record_key(rec: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    return (rec.get("config"), rec.get("level"), rec.get("seed"))


class ResultsFile:
    """Append-only JSON Lines file of episode results for one suite.

    Opening a file that does not exist (or is empty) creates it with a header.
    Opening one whose header names another suite raises :class:`ResultsMismatchError`
    and leaves the file untouched.
    """

    def __init__(self, path: str | os.PathLike[str], suite: str, meta: Mapping[str, Any] | None = None):
        self.path = Path(path)
        self.suite = str(suite)
        self._meta = dict(meta or {})
        self.header: dict[str, Any] | None = None
        self._episodes: list[dict[str, Any]] = []
        self._other: list[dict[str, Any]] = []  # lines of other kinds (e.g. "schedule_run")
        self._good_end = 0  # byte offset just past the last valid line
        self._needs_newline = False  # last valid line lacks its "\n"
        self._garbled_tail = False  # bytes after _good_end must be cut off before appending

        if self.path.exists() and self.path.stat().st_size > 0:
            self._load()
        if self.header is None and not self._garbled_tail:
            self._write_header()

    # ------------------------------------------------------------------ reading
    def _load(self) -> None:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        # ``data`` ending in "\n" leaves a final empty element, which is not a line.
        complete_last = data.endswith(b"\n")
        if complete_last:
            lines.pop()
        offset = 0
        n = len(lines)
        for idx, raw in enumerate(lines):
            lineno = idx + 1
            is_last = idx == n - 1
            end = offset + len(raw) + (0 if (is_last and not complete_last) else 1)
            if not raw.strip():
                offset = end
                if not is_last or complete_last:
                    self._good_end = end
                continue
            rec = self._parse(raw)
            if rec is None:
                if is_last:
                    warnings.warn(
                        f"{self.path}: ignoring truncated or garbled last line {lineno} "
                        "(interrupted write?); it will be cut off on the next append",
                        ResultsFileWarning,
                        stacklevel=3,
                    )
                    self._garbled_tail = True
                    break
                raise ResultsCorruptError(
                    f"{self.path}: line {lineno} is not a valid JSON object; the file is damaged "
                    "before its last line, so it cannot be resumed safely (fix or delete that line, "
                    "or pass --out with another path)"
                )
            if self.header is None:
                if rec.get("kind") != "header":
                    raise ResultsCorruptError(
                        f"{self.path}: line {lineno} should be a thrifty results header "
                        f'({{"kind": "header", ...}}); is this a thrifty results file? '
                        "Pass --out with another path."
                    )
                existing = rec.get("suite")
                if existing != self.suite:
                    raise ResultsMismatchError(
                        f"{self.path} holds results of suite {existing!r}, not {self.suite!r}; "
                        f"pass --out with another path to run suite {self.suite!r} "
                        "(or delete the file to start over)"
                    )
                self.header = rec
            elif rec.get("kind") == "episode":
                self._episodes.append(rec)
            elif rec.get("kind") == "header":
                raise ResultsCorruptError(f"{self.path}: line {lineno} is a second header")
            else:  # other kinds are kept in the file (and by `records`), ignored by everything else
                self._other.append(rec)
            offset = end
            self._good_end = end
            self._needs_newline = is_last and not complete_last

    @staticmethod
    def _parse(raw: bytes) -> dict[str, Any] | None:
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        return rec if isinstance(rec, dict) else None

    # ------------------------------------------------------------------ writing
    def _write_line(self, line: str) -> None:
        payload = line.encode("utf-8") + b"\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = "r+b" if self.path.exists() else "wb"
        with open(self.path, mode) as fh:
            if self._garbled_tail:
                fh.truncate(self._good_end)
                self._garbled_tail = False
            fh.seek(self._good_end)
            if self._needs_newline:
                payload = b"\n" + payload
                self._needs_newline = False
            fh.write(payload)
            fh.truncate()
            fh.flush()
            os.fsync(fh.fileno())
        self._good_end += len(payload)

    def _write_header(self) -> None:
        header = {
            "kind": "header",
            "suite": self.suite,
            "thrifty_version": _thrifty_version(),
            "meta": self._meta,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        line = _dumps(header)
        self._write_line(line)
        self.header = json.loads(line)

    def append(self, job: Job, result: Mapping[str, Any]) -> dict[str, Any]:
        """Write one episode line (flushed and fsync'ed); return the record as read back."""
        if job.suite != self.suite:
            raise ValueError(f"job of suite {job.suite!r} appended to results of suite {self.suite!r}")
        if not isinstance(result, Mapping):
            raise TypeError(f"episode result must be a dict, got {type(result).__name__}")
        record: dict[str, Any] = {
            "kind": "episode",
            "suite": job.suite,
            "config": job.config,
            "level": job.level,
            "seed": job.seed,
            "episode": job.episode,
        }
        for k, v in result.items():
            k = str(k)
            if k in record and record[k] != v:
                raise ValueError(f"episode result field {k!r}={v!r} conflicts with the job's {record[k]!r}")
            record[k] = v
        line = _dumps(record)
        if self.header is None:  # only a garbled header was on disk
            self._write_header()
        self._write_line(line)
        stored = json.loads(line)
        self._episodes.append(stored)
        return stored

    def append_record(self, kind: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        """Write one line of another kind than "episode" (e.g. "schedule_run": a run's scheduling metrics).
        Readers keep such lines in the file and ignore them; `records(kind)` returns them."""
        if kind in ("header", "episode"):
            raise ValueError(f"kind {kind!r} is reserved; append episodes with append()")
        line = _dumps({"kind": kind, "suite": self.suite, **{str(k): v for k, v in fields.items()}})
        if self.header is None:
            self._write_header()
        self._write_line(line)
        stored = json.loads(line)
        self._other.append(stored)
        return stored

    def records(self, kind: str) -> list[dict[str, Any]]:
        """The lines of `kind` (not "episode"), in file order (copies)."""
        return [dict(r) for r in self._other if r.get("kind") == kind]

    # ------------------------------------------------------------------ queries
    def done_keys(self) -> set[tuple[Any, Any, Any]]:
        """Keys ``(config, level, seed)`` of the episodes already in the file."""
        return {_record_key(r) for r in self._episodes}

    def episodes(self) -> list[dict[str, Any]]:
        """All episode records, in file order (copies)."""
        return [dict(r) for r in self._episodes]

    @property
    def meta(self) -> dict[str, Any]:
        """The ``meta`` of the file's header (the existing one when resuming)."""
        return dict((self.header or {}).get("meta") or self._meta)

    def __len__(self) -> int:
        return len(self._episodes)

    def __repr__(self) -> str:
        return f"ResultsFile({str(self.path)!r}, suite={self.suite!r}, episodes={len(self._episodes)})"
