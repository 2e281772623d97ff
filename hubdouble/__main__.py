"""Run the Hub double standalone until Ctrl-C:

    python -m hubdouble --port 8765 [--storage DIR] [--user alice:hf_alice[:acme=write,...]] [--cdn]
"""

from __future__ import annotations

import argparse
import sys
import time

from .hub import HubDouble


def parse_user(spec: str) -> tuple[str, str | None, dict]:
    """``name[:token[:org=role,org2=role]]``"""
    name, _, rest = spec.partition(":")
    token, _, orgs = rest.partition(":")
    roles = dict(item.split("=", 1) if "=" in item else (item, "write") for item in orgs.split(",") if item)
    return name, token or None, roles


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hubdouble", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--storage", help="keep blobs and repos in DIR (survives restarts); default: a temp dir")
    p.add_argument("--user", action="append", default=[], metavar="NAME:TOKEN[:ORG=ROLE,...]")
    p.add_argument("--org", action="append", default=[])
    p.add_argument("--cdn", action="store_true", help="redirect LFS downloads to http://localhost:PORT")
    args = p.parse_args(argv)
    hub = HubDouble(storage_dir=args.storage, cdn=args.cdn, host=args.host, port=args.port)
    for org in args.org:
        hub.add_org(org)
    for spec in args.user:
        name, token, orgs = parse_user(spec)
        hub.add_user(name, token=token, orgs=orgs)
    hub.start()
    print(f"Hub double serving at {hub.url}  (storage: {hub.storage.root})", flush=True)
    print("client env: " + " ".join(f"{k}={v}" for k, v in hub.client_env().items()), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        hub.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
