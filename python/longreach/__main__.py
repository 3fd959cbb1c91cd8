"""Command line: `python -m longreach <command>` (also the `longreach` script)."""

import argparse
import os
import sys

from ._extras import MissingExtraError, require


def _with_passive_openmp(argv) -> None:
    """Re-run this command with OMP_WAIT_POLICY=PASSIVE unless the environment sets a policy.

    PyTorch's OpenMP threads otherwise spin at every barrier, and on a machine busier than its
    cores the spinning threads take the CPU from the working ones (issue 16 measured a training
    step at 1.8 s spinning vs 0.13 s passive). libgomp reads the policy when it loads, which
    `import torch` has already done here, so the command starts again, with the same interpreter
    options and arguments, in a process that has it. Only the command line does this; scripts set
    it themselves (README "CPU threads").
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    command = list(getattr(sys, "orig_argv", None) or [sys.executable, "-m", "longreach", *argv])
    os.execv(sys.executable, command)


def _plots(rest) -> bool:
    return any(arg == "--plot" or arg.startswith("--plot=") for arg in rest)


def main(argv=None) -> int:
    if argv is None:  # the command line itself (tests call main([...]) in their own process)
        _with_passive_openmp(sys.argv[1:])
    parser = argparse.ArgumentParser(prog="longreach", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", add_help=False, help="the main job on its embedded default (for now: a short benchmark)")
    sub.add_parser("bench", add_help=False, help="benchmark local attention against PyTorch's attention and a GEMM roof")
    sub.add_parser("extrapolate", add_help=False,
                   help="train short, test long: attention/position schemes on longer inputs than trained")
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "extrapolate":  # its own parser (longreach/extrapolate/cli.py) takes the rest
            require(("tqdm", "matplotlib"), "longreach extrapolate")
            from .extrapolate.cli import main as extrapolate_main

            return extrapolate_main(rest)
        if args.command in ("bench", "demo"):  # longreach/benchmark.py parses its own flags
            if _plots(rest):
                require(("matplotlib",), f"longreach {args.command} --plot")
            from . import benchmark

            defaults = benchmark.demo_config() if args.command == "demo" else None
            return benchmark.main(rest, defaults=defaults, prog=f"longreach {args.command}")
    except MissingExtraError as error:
        print(f"longreach: error: {error}", file=sys.stderr)
        return 2
    parser.error(f"command {args.command!r} is not implemented yet")
    return 2


if __name__ == "__main__":
    sys.exit(main())
