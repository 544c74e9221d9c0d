"""Resumable runs: JSON-lines logs that survive a crash, and file fingerprints.

A long run (a cohort evaluation, a knowledge export, a benchmark sweep) appends each finished
item to a JSON-lines file as soon as it is done, so that rerunning the same command after a crash
or an interrupt skips what is already there. :class:`RunLog` keeps the run's settings in the
first line and refuses to resume a run made with other settings, so results of two set-ups are
never mixed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: runs are not locked
    fcntl = None  # type: ignore[assignment]


def write_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename, so that a kill
    leaves the old file or the new one, never a torn one (for files a resumed run reads back)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def exclusive(folder: str | Path, what: str = "run") -> Iterator[None]:
    """Hold ``folder/.lock`` for the ``with`` block, so that a second process writing the same
    results folder stops with a ``ValueError`` instead of mixing its records in. The lock goes with
    the process that holds it (a killed run leaves nothing to clean up); not locked on Windows."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ValueError(f"another {what} is writing to {folder} (it holds {folder / '.lock'}); "
                                 "let it finish or use another output folder") from None
        yield


def check_output_path(value: str | Path, flag: str, kind: str = "dir") -> Path:
    """``value`` as a path a run can write, checked before any work: not empty, a folder where
    ``kind`` is ``"dir"`` and not a folder where it is ``"file"``, and under a writable folder (not
    under a regular file). ``flag`` names the option in the ``ValueError`` (e.g. ``"--out"``)."""
    if kind not in ("dir", "file"):
        raise ValueError(f"kind = {kind!r} must be 'dir' or 'file'")
    noun = "folder" if kind == "dir" else "file"
    if not str(value).strip():
        raise ValueError(f"{flag} is empty; give a {noun} path")
    path = Path(value)
    if kind == "dir" and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {value} is an existing file; expected a folder")
    if kind == "file" and path.is_dir():
        raise ValueError(f"{flag} {value} is a folder; expected a file path")
    base = path if path.is_dir() else path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"{flag} {value} lies under {base}, which is a file, not a folder")
    if not os.access(base, os.W_OK):
        raise ValueError(f"{flag} {value}: the folder {base} is not writable")
    return path


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """The value of a JSON file; a file that is not UTF-8 JSON raises ``ValueError`` naming the
    file and ``what`` it should be (a missing one raises ``FileNotFoundError``)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a {what}: it is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not a {what}: invalid JSON at line {exc.lineno}, "
                         f"column {exc.colno} ({exc.msg})") from None


def read_jsonl(path: str | Path) -> list[Any]:
    """The values of a JSON-lines file (``[]`` if there is no file). A torn last line (a crash
    mid-write) is cut off the file; any other line that is not JSON raises ``ValueError``."""
    path = Path(path)
    if not path.is_file():
        return []
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        write_atomic(path, text)
    values = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}, is not JSON ({exc.msg}): {line[:80]!r}") from None
    return values


def file_sha256(path: str | Path) -> str:
    """The SHA-256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_ABSENT = object()


def settings_changes(before: dict[str, Any], now: dict[str, Any], keys: Iterable[str] | None = None) -> list[str]:
    """What differs between a recorded run's settings and this run's, one ``"key: X there, Y now"``
    per setting (``'(absent)'`` for a missing one), over ``keys`` (default: every key of either),
    sorted by key: the text of every refusal to resume a run with other settings."""
    names = sorted(before.keys() | now.keys() if keys is None else keys)
    return [f"{k}: {before.get(k, '(absent)')!r} there, {now.get(k, '(absent)')!r} now"
            for k in names if before.get(k, _ABSENT) != now.get(k, _ABSENT)]


class RunLog:
    """A run's finished items, one JSON line each (``{"key": ..., "value": ...}``), behind a first
    line that holds the run's settings.

    Args:
        path: The log file. It is created (with its folder) if absent; if present, the run
            resumes from it.
        settings: JSON-ready values that identify the run (what it runs and with which
            parameters, e.g. a model file's :func:`file_sha256`).

    A log that holds no item yet (its run stopped before finishing one, e.g. on a bad argument)
    takes the new settings; a log file removed while the run goes on is written again, whole, at
    the next :meth:`add`.

    Raises:
        ValueError: the file holds items of a run with other settings, or is not a run log.
    """

    def __init__(self, path: str | Path, settings: dict[str, Any]) -> None:
        self.path = Path(path)
        self.settings = json.loads(json.dumps(settings))  # as it reads back (tuples become lists)
        lines = read_jsonl(self.path)
        header = bool(lines) and isinstance(lines[0], dict) and isinstance(lines[0].get("settings"), dict)
        if header and len(lines) == 1:
            lines = []  # a run that stopped before its first item (e.g. on a bad argument): nothing to keep
        if not lines:
            self._write_settings()
        elif not (header and all(isinstance(item, dict) and item.keys() == {"key", "value"} for item in lines[1:])):
            raise ValueError(f"{self.path} is not a run log (a settings line, then key/value lines); "
                             "move it away or choose another path")
        elif lines[0]["settings"] != self.settings:
            changed = settings_changes(lines[0]["settings"], self.settings)
            raise ValueError(f"{self.path} holds an unfinished run with other settings ({'; '.join(changed)}); "
                             "rerun with its settings to resume it, or delete the file to start over")
        self._items: dict[str, Any] = {json.dumps(item["key"]): item["value"] for item in lines[1:]}

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any) -> Any | None:
        """The value logged under ``key`` (JSON-ready), or ``None``."""
        return self._items.get(json.dumps(key))

    def _write_settings(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps({"settings": self.settings}) + "\n")

    def add(self, key: Any, value: Any) -> None:
        """Log a finished item (written and flushed at once)."""
        line = json.dumps({"key": key, "value": value})
        self._items[json.dumps(key)] = json.loads(line)["value"]
        if self.path.is_file():
            lines = [line]
        else:  # removed meanwhile (by another run of the same command that finished): write it whole
            self._write_settings()
            lines = [json.dumps({"key": json.loads(k), "value": v}) for k, v in self._items.items()]
        with self.path.open("a") as f:
            f.write("".join(f"{x}\n" for x in lines))

    def remove(self) -> None:
        """Delete the log file (once the run's own output is written)."""
        self.path.unlink(missing_ok=True)
