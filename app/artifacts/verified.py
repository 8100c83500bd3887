"""Remembered verifications: the sha256 of each index file, recorded with the file's identity (device, inode,
size, mtime, ctime) when it was hashed, so that a restart on the same node does not read 2 GB to re-hash files
that have not changed (the 1M-vector index: 2.2 s of a 2.5 s cold start, docs/benchmarks.md).

The same idea as git's stat cache. Any write to a file, or a file put in its place, changes its ctime or inode,
which user space cannot set back; so an unchanged identity means unchanged bytes, except
- a change within the same clock tick as the recorded stat ("racy git"): files changed less than RACY_MARGIN_NS
  before they were hashed are not remembered;
- media bit-rot, or someone able to rewrite both the index and this record: neither is what the check is for
  (truncated or half-copied files, a wrong version, a corrupted copy), and a new node still hashes everything.

One JSON record per version directory, written atomically; a missing, unreadable or foreign record only means
the files are hashed again."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

RACY_MARGIN_NS = 2_000_000_000
_FORMAT = 1


class FileIdentity(NamedTuple):
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileIdentity:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class VerifiedFiles:
    """The record of one version directory: `remembered(rel, identity)` gives the sha256 hashed from a file with
    that identity, or None; `save` writes the record for the files just verified."""

    def __init__(self, record: Path, racy_margin_ns: int = RACY_MARGIN_NS) -> None:
        self.record, self.racy_margin_ns = record, racy_margin_ns
        self._entries: dict[str, tuple[FileIdentity, str]] = {}
        try:
            data = json.loads(record.read_text())
            if data.get("format") == _FORMAT:
                for rel, e in data["files"].items():
                    self._entries[rel] = (FileIdentity(*e["identity"]), str(e["sha256"]))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as exc:  # unreadable or foreign: hash everything
            log.warning("verification record ignored", extra={"path": str(record), "reason": type(exc).__name__})
            self._entries.clear()

    def remembered(self, rel: str, identity: FileIdentity) -> str | None:
        entry = self._entries.get(rel)
        return entry[1] if entry is not None and entry[0] == identity else None

    def save(self, verified: dict[str, tuple[FileIdentity, str]], stat_time_ns: int) -> None:
        """Record files verified from stats taken at `stat_time_ns`, leaving out those changed within the racy
        margin of it. Best effort: an unwritable location is logged and the service goes on (it hashes next time)."""
        keep = {rel: v for rel, v in verified.items() if v[0].ctime_ns < stat_time_ns - self.racy_margin_ns}
        if self._entries == keep:
            return
        body = {
            "format": _FORMAT,
            "files": {rel: {"identity": list(ident), "sha256": sha} for rel, (ident, sha) in sorted(keep.items())},
        }
        tmp = self.record.with_name(f".{self.record.name}.{os.getpid()}.tmp")
        try:
            self.record.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(body) + "\n")
            os.replace(tmp, self.record)
        except OSError as exc:
            log.warning(
                "verification not remembered", extra={"path": str(self.record), "reason": exc.strerror or str(exc)}
            )
            with contextlib.suppress(OSError):
                tmp.unlink()
            return
        self._entries = keep
