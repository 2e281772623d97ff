"""The proof that a rule's target cannot be a watched repo, checked against brute force on random patterns.

Two properties, for random fnmatch globs and templates: every collision brute force finds (names up to five
characters) is found by `target_collision` (it never lets a dangerous template through), and every example it
gives is a real collision (it never refuses a safe template with a made-up reason).
"""

from __future__ import annotations

import fnmatch
import itertools

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from web.rule_targets import Template, parse_template, split_watch, target_collision, watches

CHARS = "ab1-"
glob_piece = st.sampled_from(["a", "b", "1", "-", "*", "?", "[ab]", "[a-b1]", "A"])
globs = st.lists(glob_piece, min_size=1, max_size=5).map("".join)
affixes = st.text(alphabet=CHARS, max_size=3)


def _names(max_len: int = 5):
    for n in range(1, max_len + 1):
        for chars in itertools.product(CHARS, repeat=n):
            name = "".join(chars)
            if name[0].isalnum() and name[-1].isalnum() and "--" not in name:  # the Hub refuses "--" in names
                yield name


NAMES = list(_names())


def _matches(glob: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name.lower(), glob.lower())


@settings(max_examples=300, deadline=None)
@given(glob=globs, prefix=affixes, suffix=affixes)
def test_collisions_match_brute_force(glob, prefix, suffix):
    watch = f"ns/{glob}"
    assume(split_watch(watch) is not None)  # e.g. "ns/a--a" is no repo id, hence no watch (refused when made)
    template = Template("ns", prefix, suffix, True)
    verdict = target_collision(watch, template)
    brute = next((n for n in NAMES if _matches(glob, n) and _matches(glob, prefix + n + suffix)), None)
    if brute is not None:
        assert verdict is not None, (watch, prefix, suffix, brute)
    if verdict is not None and "?" not in verdict.split(" would be ")[0]:
        example = verdict.split("the target of ns/", 1)[1].split(" would be", 1)[0]
        assert _matches(glob, example) and _matches(glob, prefix + example + suffix), (verdict, glob)


@settings(max_examples=200, deadline=None)
@given(glob=globs, name=st.text(alphabet=CHARS + "AB", min_size=1, max_size=6))
def test_watches_is_fnmatch_ignoring_case(glob, name):
    assume(split_watch(f"ns/{glob}") is not None)  # "ns/-" is no watch pattern at all (and watches nothing)
    assert watches(f"ns/{glob}", f"NS/{name}") == _matches(glob, name)


def test_other_namespaces_and_constant_targets():
    assert target_collision("alice/*", parse_template("acme/{name}", "alice")) is None
    assert target_collision("alice/*", parse_template("{namespace}-out/{name}", "alice")) is None
    assert "every push" in target_collision("alice/*", parse_template("{namespace}/merged", "alice"))
    assert target_collision("alice/*-lora", parse_template("{namespace}/merged", "alice")) is None
    assert "the base" in target_collision("alice/*-lora", parse_template("{namespace}/merged", "alice"), ("alice/merged",))
    assert "the base alice/Base-lora-m" in target_collision("alice/*-lora", parse_template("{namespace}/{name}-m", "alice"),
                                                           ("alice/Base-lora-m",))
