"""Does Flower know a task? Flower keeps tasks in memory (and forgets them when it restarts), so the status
page links a task to Flower only after Flower's API says it knows it (``GET /api/task/info/<id>``: 200 or
404). Answers are kept for a short while per process; the first failure to reach Flower in a page stops the
asking for that page. Flower's API needs FLOWER_UNAUTHENTICATED_API=true (or no auth) to answer us."""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from urllib.parse import quote

log = logging.getLogger("sagaflow.web")

KNOWN, UNKNOWN, UNCHECKED, UNREACHABLE = "known", "unknown", "unchecked", "unreachable"
TIMEOUT = 0.5  # seconds per question
KEEP = {KNOWN: 60.0, UNKNOWN: 10.0}  # seconds an answer is kept
_cache: dict[tuple[str, str], tuple[float, str]] = {}
_lock = threading.Lock()


class FlowerAsker:
    """One page's questions to Flower: at most one failed connection per page."""

    def __init__(self, flower_url: str) -> None:
        self.url = flower_url.rstrip("/")
        self.down = False

    def state(self, task_id: str | None) -> str:
        if not self.url or not task_id:
            return UNCHECKED
        key = (self.url, task_id)
        with _lock:
            kept = _cache.get(key)
        if kept and kept[0] > time.monotonic():
            return kept[1]
        if self.down:
            return UNREACHABLE
        request = urllib.request.Request(f"{self.url}/api/task/info/{quote(task_id, safe='')}",
                                         headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as answer:  # noqa: S310 - the configured URL
                found = KNOWN if answer.status == 200 else UNCHECKED
        except urllib.error.HTTPError as exc:
            found = UNKNOWN if exc.code == 404 else UNCHECKED
        except (OSError, ValueError) as exc:
            self.down = True
            log.info("flower_unreachable", extra={"flower_url": self.url, "error": type(exc).__name__})
            return UNREACHABLE
        if found in KEEP:
            with _lock:
                if len(_cache) > 10_000:
                    _cache.clear()
                _cache[key] = (time.monotonic() + KEEP[found], found)
        return found
