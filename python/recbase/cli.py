"""The ``recbase`` command."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    from recbase._info import info

    print(json.dumps(info(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="recbase", description="Generative zero-shot recommendation.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="show version, CUDA/Triton availability and threads")
    s.set_defaults(func=_cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
