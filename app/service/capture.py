"""Query capture, opt-in (`VPS_CAPTURE_SAMPLE`, default 0: off): a sample of live query photos kept with what the
service answered, for `vps mine` to pick what to label next (docs/capture.md, with the privacy note).

Off the request path, as the shadow sampler (app/service/shadow.py): a request draws a random number and, when
sampled, puts its bytes and a summary of its answer in a bounded queue and returns; a daemon thread of its own
writes them. A full queue drops the sample; a failure is counted and logged once: capture never slows or fails a
search. The photo is stored re-encoded (decoded, EXIF orientation applied, saved as JPEG without metadata): its
EXIF (GPS position, device, time) is never written. Files live under `VPS_CAPTURE_DIR`, one directory a UTC day,
`<ms>-<request id>.jpg` beside `<ms>-<request id>.json`; the oldest go first once the directory holds more than
`VPS_CAPTURE_MAX_BYTES` or they are older than `VPS_CAPTURE_MAX_AGE_S` (checked every PRUNE_EVERY writes and
at start).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image

from app.engine.imaging import MAX_DECODE_BYTES, MAX_IMAGE_PIXELS, decode_image
from app.service.metrics import Metrics
from app.service.sampling import SampledWorker

log = logging.getLogger(__name__)

PRUNE_EVERY = 50
JPEG_QUALITY = 90
MAX_SIDE = 1600  # stored photos are scaled down to this longer side: enough to label, a fifth of a 12 MP file
_SAFE = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class CaptureJob:
    data: bytes
    answer: dict[str, Any]
    request_id: str
    at: float


class QueryCapture:
    """Owned by the app's lifespan: `start()` after load, `offer()` per search on the event loop, `stop()` at
    shutdown. With `sample == 0` no thread is started, nothing is written, and `offer()` returns at once."""

    def __init__(
        self,
        sample: float,
        directory: Path | None,
        max_bytes: int,
        max_age_s: float,
        queue_size: int,
        metrics: Metrics,
        *,
        seed: int | None = None,
    ) -> None:
        self.directory = directory
        self.max_bytes, self.max_age_s = max_bytes, max_age_s
        self._counts = {r: metrics.captures.labels(result=r) for r in ("stored", "dropped", "failed")}
        self._worker: SampledWorker[CaptureJob] = SampledWorker(
            "vps-capture",
            sample if directory is not None else 0.0,
            queue_size,
            self._store,
            self._counts["dropped"].inc,
            self._failed,
            seed=seed,
        )
        self._written = 0
        self._logged = False

    @property
    def sample(self) -> float:
        return self._worker.sample

    def start(self) -> None:
        if self._worker.sample <= 0 or self._worker.running or self.directory is None:
            return
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError:
            # Capture is an aid, not the service: searches go on without it, and the log says why.
            log.warning("query capture off: VPS_CAPTURE_DIR cannot be created", extra={"dir": str(self.directory)})
            self._worker.sample = 0.0
            return
        self._worker.start(first=self.prune)

    def offer(self, data: bytes, answer: Callable[[], dict[str, Any]], request_id: str | None) -> None:
        """On the request path: cheap, never blocks, never raises; `answer` is only called when sampled."""
        if not self._worker.sampled():
            return
        try:
            self._worker.put(CaptureJob(data, answer(), request_id or "none", time.time()))
        except Exception:
            self._failed()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Samples still queued are dropped: shutdown waits for one write at most."""
        self._worker.stop(timeout_s, count_queued=True)

    def _store(self, job: CaptureJob) -> None:
        self.write(job)
        self._counts["stored"].inc()
        self._written += 1
        if self._written % PRUNE_EVERY == 0:
            self.prune()

    def write(self, job: CaptureJob) -> Path:
        """The photo re-encoded without metadata, then its answer; the JSON last, so a photo without one is a
        write that did not finish (prune removes it with its day)."""
        assert self.directory is not None  # noqa: S101 - start() runs only with a directory
        image = decode_image(
            job.data, max_pixels=MAX_IMAGE_PIXELS, min_side=MAX_SIDE, max_decode_bytes=MAX_DECODE_BYTES
        )
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        day = self.directory / datetime.fromtimestamp(job.at, UTC).strftime("%Y%m%d")
        day.mkdir(parents=True, exist_ok=True)
        stem = f"{int(job.at * 1000)}-{_SAFE.sub('_', job.request_id)[:64]}"
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=JPEG_QUALITY)  # no exif= argument: nothing of the original's
        _write_atomic(day / f"{stem}.jpg", buf.getvalue())
        record = {"captured_at": datetime.fromtimestamp(job.at, UTC).isoformat(timespec="milliseconds"), **job.answer}
        _write_atomic(day / f"{stem}.json", json.dumps(record, ensure_ascii=False).encode())
        return day / f"{stem}.jpg"

    def prune(self) -> int:
        """Remove the oldest captures until the directory is within its bytes and age; returns files removed."""
        if self.directory is None or not self.directory.is_dir():
            return 0
        files = sorted(
            (p for p in self.directory.glob("*/*") if p.is_file()), key=lambda p: (p.name.split("-")[0], p.name)
        )
        sizes = {p: p.stat().st_size for p in files}
        total = sum(sizes.values())
        cutoff_ms = (time.time() - self.max_age_s) * 1000
        removed = 0
        for p in files:
            stamp = p.name.split("-")[0]
            old = stamp.isdigit() and int(stamp) < cutoff_ms
            if not old and total <= self.max_bytes:
                break
            with contextlib.suppress(FileNotFoundError):  # another worker pruned it first
                p.unlink()
                removed += 1
            total -= sizes[p]
        for day in self.directory.iterdir():
            if day.is_dir() and not any(day.iterdir()):
                with contextlib.suppress(OSError):
                    day.rmdir()
        return removed

    def _failed(self) -> None:
        self._counts["failed"].inc()
        if not self._logged:
            self._logged = True
            log.warning("query capture failed (counted in vps_captures_total; logged once)")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def answer_summary(body: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """What a capture keeps of the answer: the SKUs and scores, routing, versions, and the request's query."""
    return {
        "results": [{"sku": r["sku"], "score": r["score"], "category": r["category"]} for r in body["results"]],
        "match": body["match"],
        "routing": body["routing"],
        "index_version": body["index_version"],
        "model": body["model"],
        "query": params,
    }
