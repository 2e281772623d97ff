"""`make reliability`: run the fault, load-bearing and hostile-input tests, then print fault | expected | observed.

    python -m tests.support.reliability_report [extra pytest args]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str]) -> int:
    log = Path(tempfile.mkdtemp()) / "reliability.jsonl"
    env = dict(os.environ, LORAFOLD_RELIABILITY_LOG=str(log))
    cmd = [sys.executable, "-m", "pytest", "-m", "reliability", "-q", "-p", "no:cacheprovider", *argv]
    rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    print("\n| fault | expected | observed | |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['fault']} | {r['expected']} | {r['observed'] or ''} | {'ok' if r['passed'] else 'FAILED'} |")
    out = ROOT / "test-output"
    out.mkdir(exist_ok=True)
    (out / "reliability.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{sum(r['passed'] for r in rows)}/{len(rows)} rows as expected; pytest exit code {rc}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
