"""Command line: `python -m longreach <command>` (also the `longreach` script)."""

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="longreach", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="the main job on its embedded default")
    args, rest = parser.parse_known_args(argv)
    parser.error(f"command {args.command!r} is not implemented yet")
    return 2


if __name__ == "__main__":
    sys.exit(main())
