"""The one timestamp format written into stores, heads, models and reports."""

from __future__ import annotations

import time


def utc_now() -> str:
    """The current UTC time as ISO-8601 to the second, e.g. ``2026-11-23T11:27:01Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
