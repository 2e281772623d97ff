"""Fault injection for the Hub double (hub-test-server.md, "Recommendation" item 3).

A ``Fault`` matches requests by method and a regex searched in the raw URL path (no query string), e.g.
``r"^/__lfs/upload/"`` (LFS PUTs), ``r"/resolve/"`` (file reads on the main origin), ``r"^/__cdn/"`` (reads
on the CDN origin), ``r"/commit/"`` (the commit POST), ``r"/preupload/"``, ``r"\\.git/info/lfs/objects/batch$"``.

Kinds:
* ``"status"``: answer ``status`` with a JSON error body; ``headers`` adds e.g. ``X-Error-Code`` (the client
  maps RepoNotFound/RevisionNotFound/EntryNotFound/GatedRepo to its typed errors) or ``Retry-After``.
  The request body is read first so the connection stays usable (keep-alive).
* ``"reset"``: abort the connection with a TCP RST, after sending the full headers and ``after_bytes`` bytes
  of the response body, or before sending anything when ``after_bytes`` is None.
* ``"delay"``: sleep ``delay`` seconds, then serve normally.
* ``"truncate"``: send the headers with the full Content-Length but only ``after_bytes`` body bytes, then close.
* ``"ignore_range"``: answer a ranged file read with 200 and the whole file (only ranged requests match).

Optional ``origin`` ("main" | "cdn") restricts a fault to one origin; ``message`` sets the error text.
Faults fire for the first matching request(s); ``hub.request_log[i].fault`` names the kind that fired.

``times`` is how often the fault fires (None = forever) once ``start_after`` matching requests were let
through. ``hits`` counts firings; counting is thread-safe.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

KINDS = ("status", "reset", "delay", "truncate", "ignore_range")


@dataclass
class Fault:
    method: str | None = None
    path: str | None = None
    kind: str = "status"
    times: int | None = 1
    status: int = 503
    delay: float = 0.0
    after_bytes: int | None = None
    start_after: int = 0
    headers: dict | None = None
    message: str | None = None  # error text for "status" (default: the HTTP reason phrase)
    origin: str | None = None  # "main" | "cdn" | None (both)
    hits: int = field(default=0, init=False)
    seen: int = field(default=0, init=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        if self.kind == "truncate" and self.after_bytes is None:
            raise ValueError("a truncate fault needs after_bytes")
        self._regex = re.compile(self.path) if self.path else None

    def matches(self, method: str, path: str, origin: str, ranged: bool) -> bool:
        if self.method and self.method.upper() != method.upper():
            return False
        if self.origin and self.origin != origin:
            return False
        if self.kind == "ignore_range" and not ranged:
            return False
        return self._regex is None or self._regex.search(path) is not None

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times


class FaultSet:
    """The faults of one HubDouble; the first matching fault that still has firings left applies."""

    def __init__(self):
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> None:
        with self._lock:
            if fault in self._faults:
                self._faults.remove(fault)

    def clear(self) -> None:
        with self._lock:
            self._faults.clear()

    def __iter__(self):
        with self._lock:
            return iter(list(self._faults))

    def __len__(self) -> int:
        return len(self._faults)

    def take(self, method: str, path: str, origin: str, ranged: bool) -> Fault | None:
        """Count this request against matching faults and return the one that fires, if any."""
        with self._lock:
            for fault in self._faults:
                if fault.exhausted or not fault.matches(method, path, origin, ranged):
                    continue
                fault.seen += 1
                if fault.seen <= fault.start_after:
                    continue
                fault.hits += 1
                return fault
        return None
