"""A continual experiment's pushed samples on disk, one file pair per run in its checkpoint folder:

- `samples-<run>.jsonl`: one Sample per line, in the order pushed, after an optional header line
  `{"dropped": N}`: the first N samples ever pushed were compacted away, so line 1 is sample N;
- `samples-<run>.consumed`: how many samples were trained on (or skipped), counted from the first
  ever pushed, written atomically.

A checkpoint records the consumed count too, and a resumed run starts from the checkpoint's: the
samples after it are trained on again. So the file may drop only what a checkpoint has counted, and
compaction runs right after one is written: it rewrites the file with the waiting samples alone
(bounded by maxQueuedSamples), which keeps a queue fed for months as small as what waits in it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from clora.api.runtime_api import Sample

log = logging.getLogger(__name__)

HEADER_KEY = "dropped"


@dataclass
class StoredQueue:
    samples: list[Sample]  # the samples the file holds, samples[0] being sample number `base`
    base: int  # samples compacted away before the file's first
    consumed: int  # trained on (or skipped), from the first ever pushed; within [base, base + len]


def queue_path(folder: Path, run_id: str) -> Path:
    """The run's queue file. Run "" (from before run ids) kept samples.jsonl."""
    return folder / (f"samples-{run_id}.jsonl" if run_id else "samples.jsonl")


def _consumed_path(path: Path) -> Path:
    return path.with_name(path.stem + ".consumed")


def _staging_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.compacting")


def _line(sample: Sample) -> str:
    return json.dumps(sample.wire()) + "\n"


def _header(line: bytes) -> int | None:
    """N of a header line {"dropped": N}; None for any other line (a Sample needs a prompt)."""
    try:
        value = json.loads(line)
    except ValueError:
        return None
    if isinstance(value, dict) and set(value) == {HEADER_KEY} and isinstance(value[HEADER_KEY], int):
        return max(0, value[HEADER_KEY])
    return None


def read(path: Path, key: str) -> StoredQueue:
    """The stored queue. A line that does not parse (the last one torn by a crash while it was
    appended, whose POST was never answered) is skipped with a warning, and a torn end is cut off so
    that the next append starts on a line of its own; a compaction a crash interrupted is dropped
    (the file it would have replaced is whole)."""
    _staging_path(path).unlink(missing_ok=True)
    if not path.is_file():
        return StoredQueue([], 0, 0)
    data = path.read_bytes()
    lines = data.split(b"\n")
    header = _header(lines[0])
    samples: list[Sample] = []
    first = 0 if header is None else 1
    for number, line in enumerate(lines[first:], start=first + 1):
        if not line.strip():
            continue
        try:
            samples.append(Sample.model_validate_json(line))
        except ValueError as err:
            torn = number == len(lines)  # no newline after it: the write never finished
            log.warning(
                "%s: %s line %d skipped (%s): %s",
                key,
                path.name,
                number,
                "torn by a crash" if torn else "not a sample",
                str(err).splitlines()[0],
            )
    if not data.endswith(b"\n") and lines[-1].strip():
        with path.open("r+b") as f:
            f.truncate(len(data) - len(lines[-1]))
    base = header or 0
    counted = _consumed_path(path)
    try:
        consumed = int(counted.read_text()) if counted.is_file() else 0
    except ValueError:
        log.warning("%s: %s is not a count; the queue starts at its beginning", key, counted)
        consumed = 0
    return StoredQueue(samples, base, min(max(consumed, base), base + len(samples)))


def append(path: Path, samples: list[Sample]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.writelines(_line(s) for s in samples)
        f.flush()


def write_consumed(path: Path, consumed: int) -> None:
    counted = _consumed_path(path)
    staging = counted.with_name(f".{counted.name}.tmp")
    with staging.open("w") as f:
        f.write(str(consumed))
        f.flush()
        os.fsync(f.fileno())
    staging.replace(counted)  # atomic: a crash leaves the old count or the new one


def start_compaction(path: Path, dropped: int, waiting: list[Sample]) -> Path:
    """The compacted queue, written beside `path` but not yet in its place: the header, then the
    samples from number `dropped` on that the caller had (slow for a long queue: no lock held)."""
    staging = _staging_path(path)
    with staging.open("w") as f:
        f.write(json.dumps({HEADER_KEY: dropped}) + "\n")
        f.writelines(_line(s) for s in waiting)
        f.flush()
        os.fsync(f.fileno())
    return staging


def finish_compaction(staging: Path, path: Path, pushed_since: list[Sample]) -> None:
    """Put the compacted queue in place, with the samples pushed while it was written (the caller
    holds the lock appends take, so none is lost between the two)."""
    if pushed_since:
        with staging.open("a") as f:
            f.writelines(_line(s) for s in pushed_since)
            f.flush()
            os.fsync(f.fileno())
    staging.replace(path)  # atomic: a crash leaves the whole old queue or the whole new one
