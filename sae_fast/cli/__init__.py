"""`sae-fast`: the command-line entry point. Each subcommand's options are listed by `sae-fast <cmd> --help`.

One module per subcommand: each defines its runner and `add_parser(sub)`.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from sae_fast.cli import bench, demo, eval, features, info, steer, train

COMMANDS = (info, demo, bench, train, eval, features, steer)  # the order `sae-fast --help` lists them


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line naming it (the usage of `train` alone is 20 lines)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sae-fast", description=__doc__.split(":", 1)[1].split("\n")[0].strip())
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = "sae-fast " + shlex.join(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    return args.func(args)

