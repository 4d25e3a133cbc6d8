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


def _train(a: argparse.Namespace) -> None:
    from qvla.train import TrainConfig, train

    cfg = TrainConfig(policy=a.policy, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                      threads=a.threads, save_every=a.save_every)
    out = train(cfg, a.data, a.out)
    print(f"trained {a.policy} -> {out}")


def _eval(a: argparse.Namespace) -> None:
    from qvla.evaluate import evaluate, format_table

    s = evaluate(a.policy, a.suite, a.episodes_per_task, a.seed, a.workers, a.out, a.tasks)
    print(format_table({s["policy"]: s}))
    for e in s["errors"]:
        print(f"ERROR in {e['id']}: {e['error']}", file=sys.stderr)


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

    t = sub.add_parser("train", help="behaviour-clone a policy on demonstrations (CPU, resumable)")
    t.add_argument("--policy", required=True)
    t.add_argument("--data", required=True, help="demo directory written by 'qvla demos'")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int, default=6000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--save-every", type=int, default=500)
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="closed-loop evaluation on a suite's evaluation episodes")
    e.add_argument("--policy", required=True, help="registered name or checkpoint directory")
    e.add_argument("--suite", default="mt10")
    e.add_argument("--episodes-per-task", type=int, default=20)
    e.add_argument("--seed", type=int, default=0, help="shifts to a different fixed set of episodes")
    e.add_argument("--workers", type=int, default=1)
    e.add_argument("--tasks", nargs="*", default=None)
    e.add_argument("--out", default=None, help="summary JSON; per-episode records go to the .jsonl beside it")
    e.set_defaults(func=_eval)
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
