"""`python -m bench._proof_run [--fake] -- <lorafold CLI arguments>`: the CLI, in a process of its own, for the GPU
script. With --fake, whatever --device says, the math runs through the asynchronous CPU fake of worker/engine/
fake_device.py (the script's rehearsal on a machine without a GPU)."""

from __future__ import annotations

import sys


def main() -> int:
    argv = sys.argv[1:]
    fake = argv[:1] == ["--fake"]
    if fake:
        argv = argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    from worker.cli import main as cli

    if not fake:
        return cli(argv)
    from worker.engine.fake_device import use_fake_device

    argv = [("cpu" if a.startswith("cuda") and i and argv[i - 1] == "--device" else a) for i, a in enumerate(argv)]
    with use_fake_device(seed=11, max_delay=0.0005):
        return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
