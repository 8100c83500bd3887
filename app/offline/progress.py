"""Progress of offline jobs: tqdm's bar on a terminal only. Written to a file or a pipe, a redrawn bar is a line
of carriage returns that grows with every redraw, so there it is a plain log line every `every_s` seconds and one
at the end instead."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from types import TracebackType
from typing import IO, Generic, TypeVar, cast

from tqdm import tqdm

T = TypeVar("T")
log = logging.getLogger("app.offline.progress")


class Progress(Generic[T]):
    """Counts like a tqdm bar (iterate it, or `update(n)` inside `with`), and logs plain lines (INFO)."""

    def __init__(
        self, iterable: Iterable[T] | None, total: int | None, desc: str, unit: str, every_s: float, quiet: bool
    ) -> None:
        self._iterable = iterable
        self.total = total if total is not None else _length(iterable)
        self.desc, self.unit, self.every_s, self.quiet = desc, unit, every_s, quiet
        self.n = 0
        self._t0 = self._last = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator[T]:
        for item in self._iterable or ():
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every_s and not self.quiet:
            self._last = now
            self._line(now)

    def close(self) -> None:
        if not self._closed and not self.quiet:
            self._line(time.monotonic())
        self._closed = True

    def __enter__(self) -> Progress[T]:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _line(self, now: float) -> None:
        rate = self.n / max(now - self._t0, 1e-9)
        share = f" ({100 * self.n / self.total:.0f} %)" if self.total else ""
        of = f"/{self.total}" if self.total is not None else ""
        log.info(
            f"{self.desc}: {self.n}{of} {self.unit}{share}, {rate:.1f} {self.unit}/s",
            extra={"task": self.desc, "done": self.n, "total": self.total, "per_s": round(rate, 1)},
        )


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    desc: str,
    unit: str = "it",
    enabled: bool = True,
    every_s: float = 10.0,
    stream: IO[str] | None = None,
) -> Progress[T]:
    """tqdm when `stream` (default stderr) is a terminal; otherwise plain progress lines, none when disabled."""
    out = stream if stream is not None else sys.stderr
    if enabled and _is_tty(out):
        return cast(Progress[T], tqdm(iterable, total=total, desc=desc, unit=unit, file=out))
    return Progress(iterable, total, desc, unit, every_s, quiet=not enabled)


def _is_tty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _length(iterable: Iterable[T] | None) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None
