"""Deletes modelgate's request-log files once Fluent Bit has read them to the end.

modelgate never deletes its log files (it only rotates them, by --prediction_log_file_rotate_bytes)
and Fluent Bit's tail input never deletes what it read, so without this the shared emptyDir
would reach its sizeLimit and the kubelet would evict the pod. Every INTERVAL seconds:

- `<prefix>-NNNNN.jsonl` with the highest NNNNN of its prefix is the one modelgate may still
  write to: always kept.
- Any other file is closed for good (modelgate numbers on after the highest file). It is
  deleted once the offset that Fluent Bit's tail database holds for it (same path and inode)
  reaches its size: every line of it is in Fluent Bit's buffer (or already sent); and once it
  has not changed for MIN_AGE seconds, for a collector that a config reload is replacing may
  still be finishing the file it had open.
- Safety valve: if the files still take more than MAX_BYTES (Fluent Bit down or far behind),
  closed files are deleted oldest first until they fit, each one logged as dropped unshipped.
  Losing the oldest records beats eviction, which loses the whole volume and a serving pod.

Python's standard library only (sqlite3 reads the WAL-mode database while Fluent Bit writes it;
the tail input's `db.locking` must stay false). Configured by environment variables.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import sys
import time
from pathlib import Path

LOG_DIR = Path(os.environ.get("LOG_DIR", "/var/log/modelgate/requests"))
TAIL_DB = Path(os.environ.get("TAIL_DB", "/var/lib/fluent-bit/tail.db"))
INTERVAL = float(os.environ.get("INTERVAL_SECONDS", "60"))
MAX_BYTES = int(os.environ.get("MAX_BYTES", str(1536 << 20)))
MIN_AGE = float(os.environ.get("MIN_AGE_SECONDS", "120"))
NAME = re.compile(r"^(?P<stem>.+)-(?P<number>\d+)\.jsonl$")


def log(message: str) -> None:
    print(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} log-cleanup: {message}",
          flush=True)


def shipped_offsets() -> dict[tuple[str, int], int]:
    """(path, inode) -> bytes read, from the tail input's database; empty if none yet."""
    if not TAIL_DB.exists():
        return {}
    db = sqlite3.connect(str(TAIL_DB), timeout=10)
    try:
        rows = db.execute("SELECT name, inode, offset FROM in_tail_files").fetchall()
    finally:
        db.close()
    offsets: dict[tuple[str, int], int] = {}
    for name, inode, offset in rows:
        key = (name, int(inode or 0))
        offsets[key] = max(offsets.get(key, 0), int(offset or 0))
    return offsets


def closed_files() -> tuple[list[tuple[Path, os.stat_result]], int]:
    """The closed files, oldest first, and the bytes of every log file."""
    by_stem: dict[str, list[tuple[int, Path]]] = {}
    for path in LOG_DIR.iterdir():
        match = NAME.match(path.name)
        if match and path.is_file():
            by_stem.setdefault(match["stem"], []).append((int(match["number"]), path))
    closed, total = [], 0
    for files in by_stem.values():
        files.sort()
        for index, (_, path) in enumerate(files):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            total += stat.st_size
            if index < len(files) - 1:
                closed.append((path, stat))
    closed.sort(key=lambda item: item[1].st_mtime)
    return closed, total


def sweep() -> None:
    offsets = shipped_offsets()
    closed, total = closed_files()
    now = time.time()
    for path, stat in closed:
        read = offsets.get((str(path), stat.st_ino), -1)
        if read >= stat.st_size and now - stat.st_mtime >= MIN_AGE:
            path.unlink(missing_ok=True)
            total -= stat.st_size
            log(f"deleted {path.name} ({stat.st_size} bytes, shipped)")
        elif total > MAX_BYTES:
            path.unlink(missing_ok=True)
            total -= stat.st_size
            log(f"DROPPED {path.name} unshipped ({stat.st_size} bytes, {max(read, 0)} read): "
                f"log files over {MAX_BYTES} bytes")


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log(f"watching {LOG_DIR} against {TAIL_DB} every {INTERVAL:g} s, at most {MAX_BYTES} bytes")
    while True:
        try:
            sweep()
        except (OSError, sqlite3.Error) as e:
            log(f"sweep failed, next in {INTERVAL:g} s: {e}")
        time.sleep(INTERVAL)


if __name__ == "__main__":
    sys.exit(main())
