"""worker/logging_setup.py: every entry point's logging goes through `configure` (format, level, quiet
third-party loggers, secrets scrubbed). Run in a fresh interpreter: the root logger is process-wide state."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging
from worker.logging_setup import configure
configure(quiet=("chatty",))
logging.getLogger("lorafold.test").info("token %s in a message", "hf_" + "a" * 34)
logging.getLogger("chatty").info("third-party chatter")
logging.getLogger("chatty.child").warning("a real warning")
"""


def test_configure_scrubs_secrets_and_quiets_named_loggers():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    err = out.stderr
    assert "INFO lorafold.test: token" in err and "hf_" + "a" * 34 not in err, err
    assert "third-party chatter" not in err and "WARNING chatty.child: a real warning" in err, err


def test_entry_points_use_the_one_set_up():
    """No entry point configures logging by hand: `basicConfig` appears only in worker/logging_setup.py."""
    hits = [p.relative_to(ROOT).as_posix() for d in ("worker", "web", "tests/support")
            for p in (ROOT / d).rglob("*.py") if "basicConfig(" in p.read_text()]
    assert hits == ["worker/logging_setup.py"], hits
