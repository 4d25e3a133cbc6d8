"""Thin command line: parse arguments, build configs, call the library."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings


def _demos(a: argparse.Namespace) -> None:
    from qvla.demos import write_demos

    m = write_demos(a.suite, a.per_task, a.out, seed=a.seed, image_size=a.image_size, workers=a.workers)
    print(f"kept {len(m['episodes'])} of {m['attempted']} expert episodes "
          f"(dropped {len(m['dropped'])} failed ones) -> {a.out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvla", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demos", help="record scripted-expert demonstrations")
    d.add_argument("--suite", default="mt10")
    d.add_argument("--per-task", type=int, required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--image-size", type=int, default=96)
    d.add_argument("--workers", type=int, default=1)
    d.set_defaults(func=_demos)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", module="metaworld")
    try:
        args.func(args)
    except (KeyError, ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"qvla {args.command}: error: {msg}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
