"""`qvla table`: quantize a policy with every (setting, method), evaluate all of them on the same evaluation
episodes as the full-precision policy (paired), and write the results table as markdown and JSON.

Every stage's artifact is kept under OUT (calibration, checkpoints, per-episode records, bench JSON), and
a rerun skips what is already there, so an interrupted table resumes.
"""
from __future__ import annotations

import json
import math
import re
from functools import partial
from pathlib import Path
from typing import Callable

SETTING = re.compile(r"^W(\d+(?:\.\d+)?)A(4|8|16)$")


def parse_setting(s: str) -> tuple[float, int]:
    m = SETTING.match(s.upper())
    if not m:
        raise ValueError(f"setting {s!r} is not of the form W<bits>A<4|8|16>, e.g. W4A16")
    return float(m.group(1)), int(m.group(2))


def records(summary: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, Path(summary).with_suffix(".jsonl").read_text().splitlines())}


def finished_pairs(a: dict, b: dict) -> list[str]:
    """The episodes both records finished (no error in either), in a's order."""
    return [i for i in a if i in b and a[i].get("error") is None and b[i].get("error") is None]


def paired_delta(fp: dict, q: dict) -> tuple[float, float, int]:
    """Mean paired difference in success (q - fp) over episodes both finished, its 95 % normal-approximation
    half-width, and the number of pairs."""
    d = [float(q[i]["success"]) - float(fp[i]["success"]) for i in finished_pairs(fp, q)]
    if not d:
        return float("nan"), float("nan"), 0
    m = sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / max(1, len(d) - 1))
    return m, 1.96 * sd / math.sqrt(len(d)), len(d)


def mcnemar_p(wins: int, losses: int) -> float:
    """Exact two-sided McNemar test on the discordant pairs: the chance, if neither row were better, of a
    split at least this uneven (binomial, p = 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def head_to_head(a: dict, b: dict) -> dict:
    """Row a against row b on the episodes both finished: paired difference (a - b) with its 95 % interval,
    the discordant episodes (a succeeds where b fails, and the reverse) and McNemar's p."""
    m, hw, n = paired_delta(b, a)
    both = finished_pairs(a, b)
    wins = sum(bool(a[i]["success"]) and not b[i]["success"] for i in both)
    losses = sum(bool(b[i]["success"]) and not a[i]["success"] for i in both)
    return {"delta": m, "delta_ci95": hw, "pairs": n, "wins": wins, "losses": losses, "p": mcnemar_p(wins, losses)}


def is_qvla(method: str) -> bool:
    return method.split("+")[0].startswith("qvla")


def head_to_head_lines(rows: list[dict], recs: dict[str, dict]) -> tuple[list[str], list[dict]]:
    """Every QVLA row against every baseline row of the same setting; recs: each row's episode records, by
    its eval file."""
    lines = ["| Setting | QVLA row | Baseline | Δ (QVLA − baseline, 95% CI) | QVLA-only / baseline-only successes "
             "| McNemar p |", "|---|---|---|---|---|---|"]
    out = []
    for q in (r for r in rows if is_qvla(r["method"])):
        for b in (r for r in rows if r["setting"] == q["setting"] and not is_qvla(r["method"])):
            h = head_to_head(recs[q["eval"]], recs[b["eval"]])
            out.append({"setting": q["setting"], "qvla": q["method"], "baseline": b["method"], **h})
            lines.append(f"| {q['setting']} | {q['method']} | {b['method']} | {100 * h['delta']:+.1f} ± "
                         f"{100 * h['delta_ci95']:.1f} | {h['wins']} / {h['losses']} | {h['p']:.3f} |")
    return lines, out


def _done(path: Path) -> bool:
    return path.is_file() and path.with_suffix(".jsonl").is_file()


def check_source(found: str | None, source: str, what: Path, now: str = "the policy's weights are now") -> None:
    """A resumed table must not mix rows made from different weights of the same policy name."""
    if found is not None and found != source:
        raise ValueError(f"{what} was made from weights {found[:12]}, but {now} {source[:12]}; use a new --out "
                         f"(or delete {what})")


def reuse_or_evaluate(ref: str, file: Path, weights: str, ids: set[str], run: Callable[..., object],
                      now: str | None = None) -> None:
    """run(ref, out=file) evaluates `ref` on the episodes `ids`, unless `file` already holds that evaluation. One
    kept from an earlier run must be of these very weights (results are kept in git, checkpoints are rebuilt,
    maybe from other observations or by other code) and of these very episodes, or it is refused."""
    if not _done(file):
        run(ref, out=file)
        return
    check_source(json.loads(file.read_text()).get("weights_sha256"), weights, file, now or f"{ref} holds")
    if set(records(file)) != ids:
        raise ValueError(f"{file} holds other episodes than this run's; use a new --out (or delete {file})")


def run_table(policy: str, settings: list[str], methods: list[str], episodes_per_task: int, out: str | Path,
              calib: str | Path | None = None, calib_episodes: int = 10, workers: int = 1, seed: int = 0,
              form: str = "action", bench_runs: int = 20) -> dict:
    from qvla.bench import run_bench
    from qvla.calibrate import collect
    from qvla.checkpoint import WEIGHTS, sha256
    from qvla.envs import get_suite
    from qvla.evaluate import evaluate
    from qvla.policies import resolve
    from qvla.quant.methods import METHODS, QuantConfig, split_method
    from qvla.quant.pipeline import quantize

    parsed = {s: parse_setting(s) for s in settings}
    unknown = [m for m in methods if split_method(m)[0] not in METHODS]
    if unknown:
        raise KeyError(f"unknown methods {unknown}; available: {sorted(METHODS)}")
    if episodes_per_task < 1:
        raise ValueError(f"--episodes-per-task must be >= 1, got {episodes_per_task}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if calib is None:
        calib = out / "calib"
        if not (calib / "manifest.json").is_file():
            collect(policy, "mt10", calib_episodes, calib, seed)
    source = sha256(resolve(policy) / WEIGHTS)
    fp_file = out / "fp.json"
    run = partial(evaluate, suite="mt10", episodes_per_task=episodes_per_task, seed=seed, workers=workers)
    ids = {e.id for e in get_suite("mt10").episodes("eval", episodes_per_task, seed)}
    reuse_or_evaluate(policy, fp_file, source, ids, run, now="the policy's weights are now")
    rows = []
    for setting, (w, a) in parsed.items():
        for method in methods:
            name = f"{setting.lower()}-{method}"
            ckpt, ev, bj = out / "ckpt" / name, out / f"eval-{name}.json", out / f"bench-{name}.json"
            if (ckpt / "config.json").is_file():
                made_from = json.loads((ckpt / "config.json").read_text())["quantization"]["source_weights_sha256"]
                check_source(made_from, source, ckpt)
            else:
                quantize(policy, QuantConfig(method=method, w_bits=w, a_bits=a, form=form), calib, ckpt)
            reuse_or_evaluate(str(ckpt), ev, sha256(ckpt / WEIGHTS), ids, run)
            if not bj.is_file():
                run_bench(str(ckpt), bj, runs=bench_runs)
            rows.append({"setting": setting, "method": method, "checkpoint": str(ckpt), "eval": str(ev),
                         "bench": str(bj)})
    return write_table(policy, fp_file, earlier_rows(out, rows) + rows, out, episodes_per_task)


def rewrite_table(out: str | Path) -> dict:
    """Write OUT's table again from its saved rows (evaluations and benches), running nothing: for a table
    written by an earlier version of this module."""
    out = Path(out)
    old = json.loads((out / "table.json").read_text())
    return write_table(old["policy"], out / "fp.json", earlier_rows(out, []), out, old["episodes_per_task"])


def earlier_rows(out: Path, rows: list[dict]) -> list[dict]:
    """Rows of earlier `qvla table` runs into the same OUT that this run did not redo: one table per OUT."""
    old = out / "table.json"
    if not old.is_file():
        return []
    keys = {(r["setting"], r["method"]) for r in rows}
    keep = ("setting", "method", "checkpoint", "eval", "bench")
    return [{k: r[k] for k in keep} for r in json.loads(old.read_text())["rows"]
            if (r["setting"], r["method"]) not in keys and Path(r["eval"]).is_file()]


def write_table(policy: str, fp_file: Path, rows: list[dict], out: Path, episodes_per_task: int) -> dict:
    fp_sum, fp = json.loads(Path(fp_file).read_text()), records(fp_file)
    tasks = list(fp_sum["per_task"])
    pct = lambda v: "err" if v is None else f"{100 * v:.0f}"  # noqa: E731
    avg = lambda v: f"{100 * v:.1f}"  # noqa: E731  (200 episodes: averages move in half points)
    head = ("| Setting | Method | " + " | ".join(tasks) + " | Avg | Δ vs FP (95% CI) | FP successes lost / FP failures "
            "gained | Mem (MB) | Speedup vs fp32 | errors |")
    lines = [head, "|" + "---|" * (len(tasks) + 8)]
    lines.append("| FP | — | " + " | ".join(pct(fp_sum["per_task"][t]) for t in tasks)
                 + f" | {avg(fp_sum['success_rate'])} | — | — | — | 1.00 | {len(fp_sum['errors'])} |")
    table = {"policy": policy, "episodes_per_task": episodes_per_task, "fp": fp_sum["success_rate"],
             "fp_per_task": fp_sum["per_task"], "rows": []}
    bench0 = None
    order = ["rtn", "smoothquant", "awq", "omniquant", "omniquant-block", "gptq", "quarot", "qvla", "qvla-sq", "qvla-awq", "qvla-omni", "qvla-rot", "qvla-gptq",
             "qvla-rot-gptq"]
    rows = sorted(rows, key=lambda r: (*(-v for v in parse_setting(r["setting"])),
                                       order.index(r["method"]) if r["method"] in order else len(order)))
    recs = {r["eval"]: records(r["eval"]) for r in rows}  # read once: the FP pairing and the head-to-head
    for r in rows:
        s = json.loads(Path(r["eval"]).read_text())
        b = json.loads(Path(r["bench"]).read_text())
        bench0 = bench0 or b
        m, hw, n = paired_delta(fp, recs[r["eval"]])
        vs_fp = head_to_head(recs[r["eval"]], fp)  # losses: FP succeeded, this row failed; wins: the reverse
        lines.append(f"| {r['setting']} | {r['method']} | " + " | ".join(pct(s["per_task"][t]) for t in tasks)
                     + f" | {avg(s['success_rate'])} | {100 * m:+.1f} ± {100 * hw:.1f} | {vs_fp['losses']} / "
                     f"{vs_fp['wins']} | {b['weight_bytes'] / 2**20:.2f} | {b['speedup_vs_fp32']:.2f} | {len(s['errors'])} |")
        table["rows"].append({**r, "success_rate": s["success_rate"], "per_task": s["per_task"],
                              "delta": m, "delta_ci95": hw, "pairs": n, "errors": len(s["errors"]),
                              "fp_successes_lost": vs_fp["losses"], "fp_failures_gained": vs_fp["wins"],
                              "weight_bytes": b["weight_bytes"], "average_bits": b["average_bits"],
                              "latency_ms": b["latency_ms"], "speedup_vs_fp32": b["speedup_vs_fp32"],
                              "speedup_vs_bf16": b["speedup_vs_bf16"]})
    device = bench0["device"] if bench0 else {}
    note = (f"{policy}, mt10, {episodes_per_task} evaluation episodes per task, every row on the same episodes "
            f"as FP. Success in %. Δ: paired difference with a 95 % normal-approximation interval. Lost / gained: "
            f"episodes FP succeeds in that the row fails, and the reverse (Δ nets the two; a faithful quantization "
            f"has both small, while a perturbed policy can gain on FP's weak tasks what it loses elsewhere). Mem: weights "
            f"held in memory by the real-kernel checkpoint (fp32 policy: "
            f"{bench0['weight_bytes_fp32'] / 2**20:.2f} MB). Speedup: batch-1 control step vs fp32, "
            f"{device.get('cpu')}{f' {u}' if (u := device.get('uarch')) else ''}, {device.get('threads')} threads "
            f"({device.get('isa')}). Coverage: QVLA "
            f"quantizes every Linear and Conv of all four roles; GPTQ treats convs as Linear layers on their "
            f"input patches, the other baselines transform Linear layers and round convs as RTN." if bench0 else "")
    h2h_lines, table["head_to_head"] = head_to_head_lines(rows, recs)
    md = f"# Results table: {policy}\n\n{note}\n\n" + "\n".join(lines) + "\n"
    if table["head_to_head"]:
        md += ("\n## QVLA against each baseline\n\nPaired on the same episodes. A p above 0.05 means the two rows "
               "are not told apart at this number of episodes.\n\n" + "\n".join(h2h_lines) + "\n")
    (out / "table.md").write_text(md)
    (out / "table.json").write_text(json.dumps({**table, "device": device}, indent=1))
    return table
