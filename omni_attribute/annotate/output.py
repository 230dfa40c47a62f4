"""The annotated pairs file: a JSONL the trainer reads as it is, safe against a killed writer.

Each record is written as one whole line (a single ``write`` of the line and its newline on a file opened
for appending), flushed and fsynced before the next, so a killed run leaves complete lines and at most one
torn last line. Records are keyed by the pair's ``id``: a resumed run drops a torn last line (reported),
reads the ids already present and annotates only the others — no duplicates, no losses. One run at a time
writes a file (a lock beside it says so)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import AnnotateError

try:
    import fcntl
except ImportError:  # Windows: no advisory lock
    fcntl = None


def relative_path(path: str | Path, folder: Path) -> str:
    """``path`` relative to ``folder`` where possible (the trainer resolves paths against the JSONL's folder)."""
    try:
        return os.path.relpath(Path(path).resolve(), folder.resolve())
    except ValueError:  # another drive
        return str(Path(path).resolve())


def scan_jsonl(path: Path, repair: bool) -> tuple[list[dict], bool]:
    """The complete records of ``path`` and whether a torn last line was found (and, with ``repair``, cut off)."""
    records: list[dict] = []
    if not path.exists():
        return records, False
    torn, good_end = False, 0
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.endswith(b"\n"):
                torn = True
                break
            good_end += len(line)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise AnnotateError(f"{path.name}:{number} is not a complete JSON record ({exc}): the file was edited "
                                    "or damaged; remove that line (its pair is annotated again) and run again") from exc
            if not isinstance(record, dict):
                raise AnnotateError(f"{path.name}:{number} is not a JSON object: remove that line and run again")
            records.append(record)
    if torn and repair:
        with path.open("r+b") as handle:
            handle.truncate(good_end)
            handle.flush()
            os.fsync(handle.fileno())
    return records, torn


class DurableJsonl:
    """Append-only JSONL writer: one whole line per record, fsynced."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict) -> None:
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class RunLock:
    """An advisory lock on ``<output>.lock``: two runs appending to one file would interleave their work."""

    def __init__(self, output: Path):
        self.path = output.with_name(output.name + ".lock")
        self.handle = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = self.path.open("a+")
        if fcntl is not None:
            try:
                fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                self.handle.close()
                raise AnnotateError(f"another annotation run is writing {self.path.name[:-5]} (it holds {self.path.name}): "
                                    "wait for it to finish or write to another output file") from exc
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            if fcntl is not None:
                fcntl.flock(self.handle.fileno(), fcntl.LOCK_UN)
            self.handle.close()


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
