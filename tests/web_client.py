"""A small HTTP client for the web tests: real requests over a socket, answers as (status, headers, body)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

_NO_REDIRECT = urllib.request.build_opener(
    type("NoRedirect", (urllib.request.HTTPRedirectHandler,), {"redirect_request": lambda *a, **k: None})
)


@dataclass
class Answer:
    status: int
    headers: Any
    body: bytes

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def call(method: str, url: str, body: Any = None, *, raw: bytes | None = None, headers: dict | None = None,
         token: str | None = None, timeout: float = 30) -> Answer:
    """``body`` is sent as JSON; ``raw`` as is (set Content-Type in ``headers``). Redirects are not followed."""
    headers = dict(headers or {})
    data = raw
    if body is not None:
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _NO_REDIRECT.open(request, timeout=timeout) as response:
            return Answer(response.status, response.headers, response.read())
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.headers, exc.read())
