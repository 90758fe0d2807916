"""`python -m producers.gateway [--port N] [--address A]`: how `conveyor up` starts the gateway."""

from __future__ import annotations

import argparse

from producers.gateway.cli import serve
from shared.settings import Settings

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m producers.gateway")
    parser.add_argument("--port", type=int)
    parser.add_argument("--address")
    args = parser.parse_args()
    serve(Settings(), args.port, args.address)
