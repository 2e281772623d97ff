"""Where a rule may write: its watch pattern, its target template, and the proof that the two cannot meet.

A rule watches one namespace (`owner/name` or `owner/<glob>`) and renders each pushed repo's name into a target
(`{namespace}/{name}-merged`). Its jobs write with the owner's stored token, so a target that can be a watched
repo (the pushed adapter itself, or another adapter the rule watches) or one of the rule's bases would let whoever
pushes to a watched repo make the owner's token overwrite it. `target_collision` decides that for every name the
glob admits, not for a few samples: the glob is a small automaton (fnmatch semantics) and a breadth-first search
over pairs of its state sets looks for one name N with N watched and the target of N watched as well. Names are
compared case-insensitively, because the Hub resolves repo ids that way.
"""

from __future__ import annotations

import re
import string
from collections import deque
from dataclasses import dataclass

from worker.locations import is_repo_id

DEFAULT_TARGET = "{namespace}/{name}-merged"
NAMESPACE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
NAME_GLOB_RE = re.compile(r"^[A-Za-z0-9._*?\[\]-]{1,96}$")
# What a repo name can be made of, case-folded (an over-approximation of is_repo_id: a collision found with a name
# the Hub would refuse only makes the check stricter, never weaker).
ALPHABET = string.ascii_lowercase + string.digits + "._-"
MAX_STATES = 50_000  # pairs of state sets explored before giving up (then: refused, to be safe)


def split_watch(watch: str) -> tuple[str, str] | None:
    """(namespace, name glob) of a watch pattern, or None when it is not one."""
    namespace, sep, name = watch.partition("/")
    if not sep or not NAMESPACE_RE.match(namespace) or not NAME_GLOB_RE.match(name):
        return None
    if not any(c in name for c in "*?[") and not is_repo_id(watch):
        return None
    return namespace, name


def watches(watch: str, repo: str) -> bool:
    """Whether `repo` is watched by `watch` (case-insensitive, as the Hub resolves names)."""
    parts = split_watch(watch)
    namespace, _, name = repo.partition("/")
    return parts is not None and namespace.lower() == parts[0].lower() and _Glob(parts[1]).matches(name)


def render_target(template: str, namespace: str, name: str) -> str:
    return template.format(namespace=namespace, name=name)


@dataclass(frozen=True)
class Template:
    """A checked target template, for one watch namespace: the target is `namespace/prefix + {name} + suffix`
    (or the constant `namespace/prefix` when the template does not use {name})."""

    namespace: str
    prefix: str
    suffix: str
    uses_name: bool

    def render(self, name: str) -> str:
        return f"{self.namespace}/{self.prefix}{name if self.uses_name else ''}{self.suffix}"


def parse_template(template: str, watch_namespace: str) -> Template:
    """The template with {namespace} filled in; ValueError with a one-line reason when it is not usable."""
    parsed = list(string.Formatter().parse(template))
    fields = [f for _, f, _, _ in parsed if f is not None]
    bad = sorted(set(fields) - {"namespace", "name"})
    if bad or any(spec or conv for _, f, spec, conv in parsed if f is not None):
        raise ValueError(f"unknown placeholder {{{bad[0] if bad else '...'}}}")
    namespace_part, sep, name_part = template.partition("/")
    if not sep:
        raise ValueError("it has no '/' between namespace and name")
    if "{name}" in namespace_part:
        raise ValueError("the target's namespace may use {namespace} but not {name}")
    if name_part.count("{name}") > 1:
        raise ValueError("use {name} at most once")
    namespace = namespace_part.format(namespace=watch_namespace)
    prefix, found, suffix = name_part.partition("{name}")
    prefix, suffix = prefix.format(namespace=watch_namespace), suffix.format(namespace=watch_namespace)
    return Template(namespace, prefix, suffix, bool(found))


def target_collision(watch: str, template: Template, bases: tuple[str, ...] = ()) -> str | None:
    """A reason naming an example, when some watched repo's target is a watched repo or one of `bases`; else None."""
    ns, glob_text = split_watch(watch) or ("", "")
    glob = _Glob(glob_text)
    same_ns = template.namespace.lower() == ns.lower()
    if same_ns and not template.uses_name and glob.matches(template.prefix + template.suffix):
        return f"every push would be merged into {template.render('')}, which this rule watches too"
    if same_ns and template.uses_name:
        name = glob.overlap(template.prefix.lower(), template.suffix.lower())
        if name is not None:
            return (f"the target of {ns}/{name} would be {template.render(name)}, which this rule watches too: a push "
                    "could make the rule overwrite a watched repo (use another target namespace, or a watch pattern "
                    "the target cannot match, e.g. owner/*-lora with {namespace}/{name}-merged)")
    for base in bases:
        base_ns, _, base_name = base.partition("/")
        if base_ns.lower() != template.namespace.lower():
            continue
        name = _name_for(template, base_name)
        if name is not None and not template.uses_name:
            return f"every push would be merged into the base {base}"
        if name is not None and glob.matches(name):
            return f"the target of {ns}/{name} would be the base {base}: a push could make the rule overwrite its base"
    return None


def _name_for(template: Template, target_name: str) -> str | None:
    """The pushed name whose target is `target_name` (case-insensitive), if any."""
    low, pre, suf = target_name.lower(), template.prefix.lower(), template.suffix.lower()
    if not template.uses_name:
        return "x" if low == pre + suf else None  # a constant target: any pushed name gives it
    if len(low) <= len(pre) + len(suf) or not low.startswith(pre) or not low.endswith(suf):
        return None
    return low[len(pre):len(low) - len(suf)]


class _Glob:
    """fnmatch's pattern language (`*`, `?`, `[...]` with ranges) as a nondeterministic automaton over case-folded
    characters: state i = the first i items of the pattern are matched."""

    def __init__(self, pattern: str):
        self.items: list[tuple[str, object]] = []
        i = 0
        while i < len(pattern):
            c = pattern[i]
            if c == "*":
                if not self.items or self.items[-1][0] != "star":
                    self.items.append(("star", None))
            elif c == "?":
                self.items.append(("any", None))
            elif c == "[":
                end = pattern.find("]", i + 2 if i + 1 < len(pattern) and pattern[i + 1] == "]" else i + 1)
                if end < 0:  # fnmatch: an unclosed "[" is a literal
                    self.items.append(("lit", "["))
                else:
                    self.items.append(("set", _char_set(pattern[i + 1:end])))
                    i = end
            else:
                self.items.append(("lit", c.lower()))
            i += 1
        self.accept = len(self.items)

    def _close(self, states) -> frozenset[int]:
        out, todo = set(states), list(states)
        while todo:
            s = todo.pop()
            if s < self.accept and self.items[s][0] == "star" and s + 1 not in out:
                out.add(s + 1)
                todo.append(s + 1)
        return frozenset(out)

    def start(self) -> frozenset[int]:
        return self._close({0})

    def step(self, states: frozenset[int], c: str) -> frozenset[int]:
        nxt = set()
        for s in states:
            if s >= self.accept:
                continue
            kind, arg = self.items[s]
            if kind == "star":
                nxt.add(s)
            elif kind == "any" or (kind == "lit" and arg == c) or (kind == "set" and c in arg):
                nxt.add(s + 1)
        return self._close(nxt)

    def run(self, states: frozenset[int], text: str) -> frozenset[int]:
        for c in text:
            states = self.step(states, c)
            if not states:
                break
        return states

    def matches(self, name: str) -> bool:
        return self.accept in self.run(self.start(), name.lower())

    def overlap(self, prefix: str, suffix: str) -> str | None:
        """A non-empty name N that matches, with prefix+N+suffix matching too; None when there is none. Gives up (answers "?") after MAX_STATES pairs."""
        # A node is (states for N, states for prefix+N, how N ends): 0 empty, 1 a letter or digit, 2 another
        # character. Repo names start and end with a letter or digit, so only those are tried first / accepted.
        first = (self.start(), self.run(self.start(), prefix), 0)
        parents: dict = {first: None}
        queue = deque([first])
        while queue:
            node = queue.popleft()
            for c in ALPHABET:
                if node[2] == 0 and not c.isalnum():
                    continue
                nxt = (self.step(node[0], c), self.step(node[1], c), 1 if c.isalnum() else 2)
                if not nxt[0] or not nxt[1] or nxt in parents:
                    continue
                parents[nxt] = (node, c)
                if nxt[2] == 1 and self.accept in nxt[0] and self.accept in self.run(nxt[1], suffix):
                    return _path(parents, nxt)
                if len(parents) > MAX_STATES:
                    return "?"
                queue.append(nxt)
        return None


def _path(parents: dict, node) -> str:
    chars = []
    while parents[node] is not None:
        node, c = parents[node]
        chars.append(c)
    return "".join(reversed(chars))


def _char_set(body: str) -> frozenset[str]:
    """The case-folded characters of an fnmatch class body (`a-z0-9_`); the pattern alphabet has no `!`/`^`."""
    chars: set[str] = set()
    i = 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            lo, hi = body[i], body[i + 2]
            chars.update(chr(x) for x in range(ord(lo), ord(hi) + 1))
            i += 3
        else:
            chars.add(body[i])
            i += 1
    return frozenset(c.lower() for c in chars) | frozenset(c.upper().lower() for c in chars)


__all__ = ["DEFAULT_TARGET", "Template", "parse_template", "render_target", "split_watch", "target_collision",
           "watches"]
