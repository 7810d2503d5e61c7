"""The `pretrain` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pretrain import __version__
from pretrain.data import BUNDLED_CORPUS
from pretrain.errors import UserError


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="pretrain", description=__doc__)
    root.add_argument("--version", action="version", version=f"pretrain {__version__}")
    root.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = root.add_subparsers(dest="command", required=True)
    quick = commands.add_parser("quickstart", help="pretrain a tiny causal LM on a bundled corpus (about a minute)")
    quick.add_argument("--corpus", type=Path, default=BUNDLED_CORPUS, help="a text file (default: tiny Shakespeare)")
    quick.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="a new or empty directory")
    quick.add_argument("--steps", type=int, default=600)
    quick.add_argument("--seed", type=int, default=0)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "quickstart":
            if args.steps < 1:
                raise UserError(f"--steps must be at least 1, got {args.steps}")
            from pretrain.quickstart import run  # imports torch and Lightning: only when a command runs

            run(args.corpus, args.out, steps=args.steps, seed=args.seed)
    except UserError as error:
        if args.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
