"""The server's log lines: text for people, or one JSON object per line (`--log-format json`)
for log pipelines. Each record logged while an RPC runs carries that RPC's request id (the
caller's `x-request-id` metadata or a fresh one; offsite.server.metrics sets it)."""

from __future__ import annotations

import contextvars
import json
import logging
from datetime import datetime, timezone

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("offsite_request_id", default="")
FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        record.request_tag = f" [{record.request_id}]" if record.request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", ""):
            out["request_id"] = record.request_id
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(log_format: str = "text", level: int = logging.WARNING) -> logging.Handler:
    """Replace the root logger's handlers with one stderr handler in `log_format`."""
    if log_format not in FORMATS:
        raise ValueError(f"--log-format {log_format!r} is not one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
