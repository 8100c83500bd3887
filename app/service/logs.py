"""Structured (JSON lines) logging for the service."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from app.engine.imaging import install_warning_capture

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The app logs every request itself, with its request id (app/service/app.py): uvicorn's line would repeat it.
    access = logging.getLogger("uvicorn.access")
    access.handlers[:] = []
    access.propagate = False
    # Warnings become JSON log lines (logger py.warnings), and those raised while a request decodes its image go
    # to that request's collector instead: counted, logged once per request (app/service/http/routes.py).
    logging.captureWarnings(True)
    install_warning_capture()
    access.disabled = True
    # faiss's loader logs at INFO each SIMD build it tries, with a "Could not load library" traceback for each;
    # this wheel is one dynamic-dispatch build (AVX2 / AVX-512 picked at run time), so all of it is noise.
    # Whether faiss is imported before or after this call, only its warnings pass.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
