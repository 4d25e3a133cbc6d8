"""Thin command line: parse arguments, build configs, call the library."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path


def _demos(a: argparse.Namespace) -> None:
    from qvla.demos import add_states, parse_per_task, write_demos
    from qvla.envs import get_suite

    if a.add_state:
        given = [f for f in ("per_task", "out") if getattr(a, f) is not None]
        if given:
            raise ValueError(f"--add-state works on an existing directory; drop {', '.join('--' + f.replace('_', '-') for f in given)}")
        n = add_states(a.add_state, workers=a.workers)
        print(f"added states to {n} episodes of {a.add_state}")
        return
    if a.per_task is None or a.out is None:
        raise ValueError("qvla demos needs --per-task and --out (or --add-state DIR)")
    per_task = parse_per_task(a.per_task, get_suite(a.suite).tasks)
    m = write_demos(a.suite, per_task, a.out, seed=a.seed, image_size=a.image_size, workers=a.workers)
    print(f"kept {len(m['episodes'])} of {m['attempted']} expert episodes "
          f"(dropped {len(m['dropped'])} failed ones) -> {a.out}")


def _train(a: argparse.Namespace) -> None:
    from qvla.train import TrainConfig, train

    cfg = TrainConfig(policy=a.policy, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                      threads=a.threads, save_every=a.save_every, aux_state=a.aux_state, shift=a.shift)
    out = train(cfg, a.data, a.out)
    print(f"trained {a.policy} -> {out}")


def _eval(a: argparse.Namespace) -> None:
    from qvla.evaluate import evaluate, format_table

    s = evaluate(a.policy, a.suite, a.episodes_per_task, a.seed, a.workers, a.out, a.tasks, kernels=a.kernels)
    print(format_table({s["policy"]: s}))
    for e in s["errors"]:
        print(f"ERROR in {e['id']}: {e['error']}", file=sys.stderr)


def _table(a: argparse.Namespace) -> None:
    from qvla.table import rewrite_table, run_table

    if a.rewrite:
        rewrite_table(a.out)
    elif not a.policy:
        raise ValueError("--policy is required (unless --rewrite)")
    else:
        run_table(a.policy, a.settings.split(","), a.methods.split(","), a.episodes_per_task, a.out, a.calib,
                  a.calib_episodes, a.workers, a.seed, a.form)
    print((Path(a.out) / "table.md").read_text())


def _select(a: argparse.Namespace) -> None:
    from qvla.select import format_selection, run_select

    res = run_select(a.policy, a.candidates, a.episodes_per_task, a.out, a.seed, a.workers, a.suite, a.tasks)
    print(format_selection(res))
    print(f"chosen: {res['chosen']}")


def _bench(a: argparse.Namespace) -> None:
    from qvla.bench import format_bench, run_bench

    print(format_bench(run_bench(a.policy, a.out, a.runs, a.warmup, a.threads)))


def _calibrate(a: argparse.Namespace) -> None:
    from qvla.calibrate import collect

    m = collect(a.policy, a.suite, a.episodes, a.out, a.seed, acting=a.acting)
    calls = sum(e["calls"] for e in m["episodes"])
    print(f"{len(m['episodes'])} calibration episodes, {calls} policy calls -> {a.out}")


def _sensitivity(a: argparse.Namespace) -> None:
    from qvla.quant.pipeline import run_sensitivity

    r = run_sensitivity(a.policy, a.calib, a.out, a.form, a.a_bits, a.validate, a.suite, a.seed, a.probes)
    print(f"sensitivity of {r['channels']} channels in {r['layers']} layers over {r['observations']} "
          f"steps: {r['seconds']:.1f} s -> {a.out}")
    if "validation" in r:
        v = r["validation"]
        print(f"validation over {v['k']} triples: Spearman product {v['spearman_product']:.3f}, "
              f"projected {v['spearman_projected']:.3f}; exhaustive/proxy time {v['exhaustive_over_proxy']:.0f}x")


def _pins(items: list[str]) -> dict[str, int]:
    pins = {}
    for item in items:
        key, sep, bits = item.rpartition("=")
        if not sep or not bits.isdigit():
            raise ValueError(f"--keep expects ROLE=BITS or re:REGEX=BITS, got {item!r}")
        pins[key] = int(bits)
    return pins


def _quantize(a: argparse.Namespace) -> None:
    from qvla.quant.methods import QuantConfig
    from qvla.quant.pipeline import quantize

    cfg = QuantConfig(method=a.method, w_bits=a.w_bits, a_bits=a.a_bits, form=a.form, proxy=a.proxy,
                      solver=a.solver, pins=_pins(a.keep), no_prune=a.no_prune, probes=a.probes,
                      count=a.count, weighting=a.weighting, tie=a.tie, alpha=a.alpha)
    out = quantize(a.policy, cfg, a.calib, a.out, a.suite, tune_on=a.tune_on)
    q = json.loads((out / "config.json").read_text())["quantization"]
    print(f"{a.method} W{a.w_bits:g}A{a.a_bits}: average {q['average_bits']:.3f} bits per weight -> {out}")


def _report(a: argparse.Namespace) -> None:
    from qvla.report import write_report

    print(f"wrote {write_report(a.sensitivity, a.plans, a.out)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qvla", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demos", help="record scripted-expert demonstrations")
    d.add_argument("--suite", default="mt10")
    d.add_argument("--per-task", metavar="N[,TASK=N...]",
                   help="expert episodes attempted per task; e.g. 40,reach=200 gives reach its own count")
    d.add_argument("--out")
    d.add_argument("--add-state", metavar="DIR",
                   help="add the privileged state to the episodes of an existing demo directory (replay)")
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
    t.add_argument("--shift", type=int, default=6,
                   help="random-shift augmentation in pixels, each camera image on its own (0: off)")
    t.add_argument("--aux-state", type=float, default=0.0,
                   help="weight of the training-only loss predicting hand/object/goal positions (0: off)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="closed-loop evaluation on a suite's evaluation episodes")
    e.add_argument("--policy", required=True, help="registered name or checkpoint directory")
    e.add_argument("--suite", default="mt10")
    e.add_argument("--episodes-per-task", type=int, default=20)
    e.add_argument("--seed", type=int, default=0, help="shifts to a different fixed set of episodes")
    e.add_argument("--workers", type=int, default=1)
    e.add_argument("--tasks", nargs="*", default=None)
    e.add_argument("--out", default=None, help="summary JSON; per-episode records go to the .jsonl beside it")
    e.add_argument("--kernels", choices=["real", "simulated"], default="real",
                   help="quantized checkpoints: real integer kernels on packed weights, or the fake-quant path")
    e.set_defaults(func=_eval)

    t = sub.add_parser("table", help="quantize + evaluate every (setting, method), paired against FP")
    t.add_argument("--policy", help="registered name or checkpoint directory (not needed with --rewrite)")
    t.add_argument("--rewrite", action="store_true",
                   help="only write OUT's table.md/json again from its saved rows (runs nothing)")
    t.add_argument("--settings", default="W8A8,W4A4,W4A16")
    t.add_argument("--methods", default="rtn,smoothquant,awq,omniquant,gptq,qvla")
    t.add_argument("--episodes-per-task", type=int, default=20)
    t.add_argument("--calib", default=None, help="calibration directory (default: OUT/calib, collected first)")
    t.add_argument("--calib-episodes", type=int, default=10)
    t.add_argument("--form", default="action", choices=["action", "logits"])
    t.add_argument("--workers", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", required=True)
    t.set_defaults(func=_table)

    c = sub.add_parser("select", help="choose among quantized checkpoints by closed-loop success on calib episodes")
    c.add_argument("--policy", required=True, help="the full-precision policy the candidates were made from")
    c.add_argument("--candidates", nargs="+", required=True, help="quantized checkpoint directories, preferred first")
    c.add_argument("--suite", default="mt10")
    c.add_argument("--episodes-per-task", type=int, default=50)
    c.add_argument("--seed", type=int, default=100,
                   help="suite seed of the calib episodes acted on; must not be one the candidates were calibrated on")
    c.add_argument("--tasks", nargs="*", default=None, help="a subset of the suite's tasks (default: all)")
    c.add_argument("--workers", type=int, default=1)
    c.add_argument("--out", required=True, help="directory: fp.json, cand-<k>.json and selection.json")
    c.set_defaults(func=_select)

    b = sub.add_parser("bench", help="control-step latency and weight memory vs the fp32 and bf16 forms")
    b.add_argument("--policy", required=True, help="registered name or checkpoint directory")
    b.add_argument("--out", default=None, help="JSON file for the results")
    b.add_argument("--runs", type=int, default=50)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--threads", type=int, default=2)
    b.set_defaults(func=_bench)

    c = sub.add_parser("calibrate", help="roll out the full-precision policy on calibration episodes")
    c.add_argument("--policy", required=True)
    c.add_argument("--suite", default="mt10")
    c.add_argument("--episodes", type=int, default=10)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--acting", default=None, metavar="CKPT",
                   help="a quantized checkpoint of --policy acts instead: its states, the policy's sensitivities")
    c.add_argument("--out", required=True)
    c.set_defaults(func=_calibrate)

    s = sub.add_parser("sensitivity", help="action-space sensitivity of every channel at 8/4/2/0 bits")
    s.add_argument("--policy", required=True)
    s.add_argument("--calib", required=True)
    s.add_argument("--out", required=True, help=".safetensors file; a .json report is written beside it")
    s.add_argument("--form", default="action", choices=["action", "logits"])
    s.add_argument("--a-bits", type=int, default=16)
    s.add_argument("--validate", type=int, default=0, metavar="K", help="check the proxy on K random triples")
    s.add_argument("--suite", default=None, help="refuse calibration data from another suite")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--probes", type=int, default=None,
                   help="random projections per batch (default: exact Jacobian rows; 16 for --form logits)")
    s.set_defaults(func=_sensitivity)

    q = sub.add_parser("quantize", help="quantize a policy and write the quantized checkpoint")
    q.add_argument("--policy", required=True)
    q.add_argument("--method", default="qvla",
                   help="qvla, qvla-sq, qvla-awq, qvla-omni, qvla-gptq, qvla-rot, qvla-rot-gptq, qvla-rot-gptaq, qvla-srot or a baseline (rtn, smoothquant, awq, gptq, "
                        "omniquant, omniquant-block, quarot); suffixes add refining stages: '+ac' activation clipping (A8/A4), '+bc' bias correction, "
                        "'+lc' layer-calibrated sensitivities (QVLA family), '+lcp' the same with each layer's pruning "
                        "measured and priced apart (and no default no-prune rule), '+lcl' compared with each layer's linearized "
                        "deviation instead of its channel sum (--form action), '+at' the codes kept and every quantized layer's scales "
                        "and bias trained end to end on the action deviation (calibration episodes, one in five held out)")
    q.add_argument("--w-bits", type=float, required=True, help="average weight bits per weight (budget)")
    q.add_argument("--a-bits", type=int, default=16, choices=[4, 8, 16])
    q.add_argument("--calib", default=None)
    q.add_argument("--tune-on", nargs="+", default=None, metavar="DIR",
                   help="'+at' only: calibration directories whose steps the tuning also fits, e.g. the states a "
                        "quantized checkpoint reaches (qvla calibrate --acting CKPT); the plan comes from --calib alone")
    q.add_argument("--suite", default="mt10")
    q.add_argument("--form", default="action", choices=["action", "logits"])
    q.add_argument("--proxy", default="projected", choices=["product", "projected", "energy"],
                   help="projected = ||J dx|| (default: Spearman 0.999 vs truth); product = ||J||*||dx||; "
                        "energy = ||J dx||^2, which adds up over channels whose errors are uncorrelated")
    q.add_argument("--solver", default="greedy", choices=["greedy", "exact"])
    q.add_argument("--keep", nargs="*", default=[], metavar="ROLE=BITS",
                   help="lowest bits allowed for a role or re:REGEX layer pattern, e.g. lm_head=16")
    q.add_argument("--no-prune", nargs="*", default=None, metavar="ROLE",
                   help="roles that may not use 0 bits (default: vision below an average of 4 bits; "
                        "--no-prune alone lets every role prune)")
    q.add_argument("--probes", type=int, default=None)
    q.add_argument("--alpha", type=float, default=0.5,
                   help="SmoothQuant's migration strength in [0, 1] (smoothquant, qvla-sq, qvla-srot): 0 leaves the "
                        "activations as they are, 1 moves all of their range into the weights")
    q.add_argument("--count", default="stored", choices=["stored", "held"],
                   help="the budget counts bits as stored on disk, or as the CPU kernels hold them (2 bits as 4)")
    q.add_argument("--weighting", default="steps", choices=["steps", "episode"],
                   help="calibration steps weigh 1 each, or each calibration episode weighs the same")
    q.add_argument("--tie", action="store_true",
                   help="channels multiplied elementwise (SwiGLU gate/up) share bits, so the down projection "
                        "absorbs their bucket order instead of an index copy at run time")
    q.add_argument("--out", required=True)
    q.set_defaults(func=_quantize)

    r = sub.add_parser("report", help="plots and a markdown summary of sensitivities and plans")
    r.add_argument("--sensitivity", required=True, help="file written by 'qvla sensitivity'")
    r.add_argument("--plans", nargs="*", default=[], help="quantized checkpoint or plan directories")
    r.add_argument("--out", required=True)
    r.set_defaults(func=_report)
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
