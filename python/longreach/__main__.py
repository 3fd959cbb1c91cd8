"""Command line: `python -m longreach <command>` (also the `longreach` script)."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="longreach", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", add_help=False, help="the main job on its embedded default (for now: a short benchmark)")
    sub.add_parser("bench", add_help=False, help="benchmark local attention against PyTorch's attention and a GEMM roof")
    sub.add_parser("extrapolate", add_help=False,
                   help="train short, test long: attention/position schemes on longer inputs than trained")
    args, rest = parser.parse_known_args(argv)
    if args.command == "extrapolate":  # its own parser (longreach/extrapolate/cli.py) takes the rest
        from .extrapolate.cli import main as extrapolate_main

        return extrapolate_main(rest)
    if args.command in ("bench", "demo"):  # longreach/benchmark.py parses its own flags
        from . import benchmark

        defaults = benchmark.demo_config() if args.command == "demo" else None
        return benchmark.main(rest, defaults=defaults, prog=f"longreach {args.command}")
    parser.error(f"command {args.command!r} is not implemented yet")
    return 2


if __name__ == "__main__":
    sys.exit(main())
