"""Keeping Hub tokens and webhook secrets out of every string that leaves the process.

Tokens are never logged on purpose; this is the safety net for strings we do not control (exception texts of
libraries, URLs with credentials). It masks anything shaped like a Hugging Face token, the value after `Bearer `
when it is shaped like a credential, and the secrets registered with `register()`.

Only secrets this process really holds are registered: tokens the Hub accepted (worker/hub registers a token when
`whoami` answers for it, or when it reads or writes with it) and the webhook secrets of rules. Registering whatever
a stranger sent as a Bearer value let anyone blind the logs (a "token" `GET` turned lines into `*** /...`) and
grow the list without bound (178 ms per log line at 100k strings; issue 10 §2). So the registry is:
- bounded: the MAX_SECRETS most recently registered secrets (LRU; registering a known one moves it up);
- found in time independent of its size: a secret is a run of token characters, so the text's runs of those
  characters are found with one compiled pattern, and every KEY-th position of a run costs one dict lookup in an
  index of the secrets' pieces (see _Registry). A regex alternation of 4,096 secrets, even shaped as a trie, took
  1.7 s to compile and 90 us per log line (the engine tries every first character in turn).
The token shapes (hf_..., Bearer ...) are one more compiled pattern. Cost at the bound: see
tests/web/test_security.py::test_redaction_is_bounded_and_cheap_at_the_bound (3.5-6 us per access-log
line at 4,096 secrets on the 2-core CI machine).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict

MAX_SECRETS = 4096
MIN_SECRET = 8  # shorter strings would mask ordinary words (every real token and secret is far longer)
KEY = 8  # the length of the indexed pieces, and the step at which text is looked up
INDEXED = 2 * KEY - 1  # secrets at least this long are found through the index (Hub tokens: 37, secrets: 43)
_RUN = re.compile(r"[A-Za-z0-9_-]+")  # the characters of Hub tokens and of secrets.token_urlsafe()
_RUNS = re.compile(rf"[A-Za-z0-9_-]{{{INDEXED},}}")

_HF_TOKEN = r"hf_[A-Za-z0-9_]{6,}"  # a literal first: the engine jumps to candidates
# A Bearer value is masked when it is credential-shaped (RFC 6750 token68 characters, 8 or more), but not when it
# is a plain word: "send Authorization: Bearer <token>" and "(Bearer scheme)" must read normally.
_BEARER = r"(?P<prefix>(?i:\bbearer\s+))(?![A-Za-z][a-z]*\b)[A-Za-z0-9._~+/=-]{8,}"
_SHAPES = re.compile(f"(?P<hf>{_HF_TOKEN})|(?P<bearer>{_BEARER})")


class _Registry:
    """The registered secrets in LRU order, and an index of the KEY-long pieces that start at their first KEY
    offsets. Any occurrence of a secret at least 2*KEY-1 long covers, for whatever alignment, one piece that starts
    at a multiple of KEY from the start of the run it lies in; so the text is looked up only every KEY characters
    (one dict lookup each) and a hit is verified with `startswith`. Secrets that are shorter or have characters
    outside the run alphabet (none in practice) are kept apart and looked for with `in`."""

    def __init__(self, limit: int):
        self.limit = limit
        self._secrets: OrderedDict[str, None] = OrderedDict()
        self._pieces: dict[str, list[tuple[str, int]]] = {}  # piece → (secret, offset of the piece in it)
        self._odd: set[str] = set()
        self._lock = threading.Lock()

    def add(self, secret: str) -> None:
        with self._lock:
            if secret in self._secrets:
                self._secrets.move_to_end(secret)
                return
            self._secrets[secret] = None
            if len(secret) >= INDEXED and _RUN.fullmatch(secret):
                for offset in range(KEY):
                    self._pieces.setdefault(secret[offset:offset + KEY], []).append((secret, offset))
            else:
                self._odd.add(secret)
            while len(self._secrets) > self.limit:
                self._drop(next(iter(self._secrets)))

    def discard(self, secret: str) -> None:
        with self._lock:
            if secret in self._secrets:
                self._drop(secret)

    def _drop(self, secret: str) -> None:
        del self._secrets[secret]
        if secret in self._odd:
            self._odd.discard(secret)
            return
        for offset in range(KEY):
            piece = secret[offset:offset + KEY]
            entries = [entry for entry in self._pieces.get(piece, ()) if entry[0] != secret]
            if entries:
                self._pieces[piece] = entries
            else:
                self._pieces.pop(piece, None)

    def __contains__(self, secret: str) -> bool:
        return secret in self._secrets

    def __len__(self) -> int:
        return len(self._secrets)

    def mask(self, text: str) -> str:
        """`text` with every registered secret replaced by ***."""
        if not self._secrets:
            return text
        with self._lock:  # a consistent view; scrubbing takes microseconds
            spans = _indexed_spans(text, self._pieces) if self._pieces else []
            odd = list(self._odd)
        if spans:
            text = _star_spans(text, spans)
        for secret in odd:
            if secret in text:
                text = text.replace(secret, "***")
        return text


def _indexed_spans(text: str, pieces: dict[str, list[tuple[str, int]]]) -> list[tuple[int, int]]:
    """Where indexed secrets occur in `text`: each run of token characters is cut into KEY-aligned pieces, and a
    piece some secret holds (at some offset) is checked for the whole secret at the place it implies."""
    spans: list[tuple[int, int]] = []
    keys = pieces.keys()
    for run in _RUNS.finditer(text):
        word, base = run.group(), run.start()
        aligned = [word[i:i + KEY] for i in range(0, len(word) - KEY + 1, KEY)]
        if keys.isdisjoint(aligned):  # the usual case, decided in C
            continue
        for index, piece in enumerate(aligned):
            for secret, offset in pieces.get(piece, ()):
                at = base + index * KEY - offset
                if at >= 0 and text.startswith(secret, at):
                    spans.append((at, at + len(secret)))
    return spans


def _star_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with the (possibly overlapping) spans replaced by one *** each run of overlap."""
    out, at = [], 0
    for a, b in sorted(spans):
        if b <= at:
            continue
        out.append(text[at:max(a, at)])
        out.append("***" if a >= at else "")
        at = b
    out.append(text[at:])
    return "".join(out)


_registry = _Registry(MAX_SECRETS)


def register(secret: str | None) -> None:
    """Mask `secret` from now on (while it stays among the MAX_SECRETS most recently registered)."""
    if secret and len(secret) >= MIN_SECRET:
        _registry.add(secret)


def forget(secret: str | None) -> None:
    if secret:
        _registry.discard(secret)


def is_registered(secret: str) -> bool:
    return secret in _registry


def registered_count() -> int:
    return len(_registry)


def _replace(match: re.Match) -> str:
    if match.group("hf") is not None:
        return "hf_***"
    return match.group("prefix") + "***"  # keep "Bearer " as written


def scrub(text: str) -> str:
    if not text:
        return text
    text = _registry.mask(text)
    # The shapes pattern costs ~15 us on a log line even when nothing matches; two substring tests skip it then.
    if "hf_" in text or "earer" in text.lower():
        text = _SHAPES.sub(_replace, text)
    return text


class RedactingFilter:
    """A logging filter that scrubs secrets from every record (messages and arguments)."""

    def filter(self, record) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True


def install_log_filter() -> None:
    import logging

    f = RedactingFilter()
    for handler in logging.getLogger().handlers:
        handler.addFilter(f)
