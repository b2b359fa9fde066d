#!/usr/bin/env python
"""Generate test TLS certificates (and SuperNode auth keys) for a local Flower deployment.

    python scripts/make_certs.py OUT_DIR [--hosts 127.0.0.1 localhost ::1] [--supernodes N]

Writes ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` and, with ``--supernodes N``,
``supernode-<i>`` / ``supernode-<i>.pub`` (EC P-384, OpenSSH format). Use them as::

    flower-superlink --ssl-ca-certfile OUT/ca.crt --ssl-certfile OUT/server.pem \\
        --ssl-keyfile OUT/server.key [--enable-supernode-auth] ...
    flwr supernode register OUT/supernode-0.pub <connection>
    flower-supernode --root-certificates OUT/ca.crt \\
        [--auth-supernode-private-key OUT/supernode-0] ...

The functions live in ``fedlrm.tools.certs``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedlrm.tools.certs import DEFAULT_HOSTS, generate_supernode_keys, generate_tls_certs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--hosts", nargs="+", default=list(DEFAULT_HOSTS),
                    help="SANs of the server certificate (IPs or DNS names)")
    ap.add_argument("--days", type=int, default=30, help="validity in days")
    ap.add_argument("--supernodes", type=int, default=0,
                    help="also generate this many SuperNode auth key pairs")
    args = ap.parse_args(argv)

    tls = generate_tls_certs(args.out_dir, hosts=args.hosts, days=args.days)
    for name, path in vars(tls).items():
        print(f"{name:12s} {path}")
    for i in range(args.supernodes):
        keys = generate_supernode_keys(args.out_dir, f"supernode-{i}")
        print(f"supernode-{i}  {keys.private_key}  {keys.public_key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
