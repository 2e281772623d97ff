"""The README stays true: every setting is in its environment table, every CLI option and API route is named."""

from __future__ import annotations

import re
from pathlib import Path

from worker.cli import build_parser
from worker.settings import Settings

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_documented():
    rows = set(re.findall(r"^\| `([A-Z_]+)` \|", README, re.M))
    missing = [env for env, _, _ in Settings.documented() if env not in rows]
    assert not missing, f"README's configuration table lacks {missing}"
    extra = rows - {env for env, _, _ in Settings.documented()}
    assert not extra, f"README documents settings that do not exist: {extra}"


def test_every_merge_option_is_documented():
    merge = build_parser()._subparsers._group_actions[0].choices["merge"]
    options = {opt for action in merge._actions for opt in action.option_strings if opt.startswith("--")}
    options -= {"--help", "--quiet", "--verbose"}
    missing = sorted(o for o in options if o not in README)
    assert not missing, f"README does not mention {missing}"


def test_the_two_commands_of_the_quick_start():
    assert "make run" in README and "make test" in README and "make demo" in README


def test_every_http_route_is_in_the_readme(tmp_path):
    from web import create_app

    settings = Settings(data_dir=str(tmp_path), secret_key="docs-test-key-0123456789-0123456789").resolved()
    app = create_app(settings, enqueue=lambda job_id: None)
    missing = []
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(("/api/", "/hooks/", "/healthz", "/metrics")):
            continue
        shown = re.sub(r"<([a-z_]+:)?([a-z_]+)>", r"<\2>", rule.rule)
        generic = re.sub(r"<[a-z_]+>", "<id>", shown)
        if shown not in README and generic not in README and rule.rule not in README:
            missing.append(shown)
    assert not missing, f"README does not name {sorted(set(missing))}"
