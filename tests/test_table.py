"""qvla table: setting parsing, the paired difference, and the written table (on synthetic records)."""
from __future__ import annotations

import json

import pytest

from qvla.table import head_to_head, mcnemar_p, paired_delta, parse_setting, run_table, write_table


@pytest.mark.parametrize("s, expected", [("W4A16", (4.0, 16)), ("w8a8", (8.0, 8)), ("W2.5A16", (2.5, 16))])
def test_parse_setting(s, expected):
    assert parse_setting(s) == expected


@pytest.mark.parametrize("s", ["W4", "A8W8", "W4A5", "4A16"])
def test_parse_setting_refuses_malformed(s):
    with pytest.raises(ValueError, match="W<bits>A<4|8|16>"):
        parse_setting(s)


def test_paired_delta_ignores_errored_episodes_and_pairs_by_id():
    fp = {"a": {"success": True}, "b": {"success": False}, "c": {"success": True}, "d": {"success": True}}
    q = {"a": {"success": True}, "b": {"success": True}, "c": {"success": False, "error": "boom"},
         "d": {"success": False}}
    m, hw, n = paired_delta(fp, q)
    assert n == 3 and m == pytest.approx(0.0) and hw > 0


@pytest.mark.parametrize("wins, losses, p", [(0, 6, 2 / 64), (3, 3, 1.0), (0, 0, 1.0), (1, 9, 2 * 11 / 1024)])
def test_mcnemar_exact(wins, losses, p):
    assert mcnemar_p(wins, losses) == pytest.approx(p) and mcnemar_p(losses, wins) == pytest.approx(p)


def test_head_to_head_counts_discordant_pairs_only():
    a = {"a": {"success": True}, "b": {"success": True}, "c": {"success": False}, "d": {"success": True, "error": "x"}}
    b = {"a": {"success": True}, "b": {"success": False}, "c": {"success": True}, "d": {"success": False}}
    h = head_to_head(a, b)
    assert (h["wins"], h["losses"], h["pairs"]) == (1, 1, 3) and h["p"] == 1.0 and h["delta"] == pytest.approx(0.0)


def write_eval(path, successes: dict[str, bool], tasks=("reach", "push"), weights_sha256: str | None = None):
    recs = [{"id": i, "task": tasks[k % len(tasks)], "success": s, "error": None} for k, (i, s) in enumerate(successes.items())]
    path.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    per_task = {t: sum(r["success"] for r in recs if r["task"] == t) / max(1, sum(r["task"] == t for r in recs))
                for t in tasks}
    path.write_text(json.dumps({"success_rate": sum(successes.values()) / len(successes), "per_task": per_task,
                                "errors": [], **({"weights_sha256": weights_sha256} if weights_sha256 else {})}))


def test_write_table_reads_every_row(tmp_path):
    write_eval(tmp_path / "fp.json", {"e0": True, "e1": True, "e2": False, "e3": True})
    write_eval(tmp_path / "eval-x.json", {"e0": False, "e1": True, "e2": True, "e3": False})
    bench = {"weight_bytes": 2**20, "average_bits": 4.0, "latency_ms": 5.0, "speedup_vs_fp32": 1.5,
             "speedup_vs_bf16": 3.0, "weight_bytes_fp32": 4 * 2**20, "device": {"cpu": "x", "threads": 2, "isa": "AVX2"}}
    (tmp_path / "bench-x.json").write_text(json.dumps(bench))
    rows = [{"setting": "W4A16", "method": "rtn", "checkpoint": "c", "eval": str(tmp_path / "eval-x.json"),
             "bench": str(tmp_path / "bench-x.json")}]
    t = write_table("p", tmp_path / "fp.json", rows, tmp_path, 2)
    assert t["rows"][0]["delta"] == pytest.approx(-0.25) and t["rows"][0]["pairs"] == 4
    md = (tmp_path / "table.md").read_text()
    assert "| W4A16 | rtn | 50 | 50 | 50.0 | -25.0 ±" in md and "1.00 | 1.50 |" in md
    # e0 and e3 lost, e2 gained: Δ nets them to one episode of four
    assert "| 2 / 1 | 1.00 |" in md and (t["rows"][0]["fp_successes_lost"], t["rows"][0]["fp_failures_gained"]) == (2, 1)
    assert "| FP | — | 50 | 100 | 75.0 | — |" in md  # the average keeps its half points
    assert json.loads((tmp_path / "table.json").read_text())["rows"][0]["method"] == "rtn"
    assert "QVLA against each baseline" not in md  # no QVLA row, nothing to compare


def test_write_table_compares_qvla_with_each_baseline_of_its_setting(tmp_path):
    write_eval(tmp_path / "fp.json", {f"e{i}": True for i in range(8)})
    rows = []
    for name, ok in [("rtn", [0] * 8), ("qvla", [1] * 8), ("gptq", [1] * 4 + [0] * 4)]:
        write_eval(tmp_path / f"eval-{name}.json", {f"e{i}": bool(v) for i, v in enumerate(ok)})
        (tmp_path / f"bench-{name}.json").write_text(json.dumps(
            {"weight_bytes": 1, "average_bits": 4.0, "latency_ms": 1.0, "speedup_vs_fp32": 1.0, "speedup_vs_bf16": 1.0,
             "weight_bytes_fp32": 4, "device": {}}))
        rows.append({"setting": "W8A8" if name == "gptq" else "W4A16", "method": name, "checkpoint": "c",
                     "eval": str(tmp_path / f"eval-{name}.json"), "bench": str(tmp_path / f"bench-{name}.json")})
    t = write_table("p", tmp_path / "fp.json", rows, tmp_path, 4)
    assert [(h["qvla"], h["baseline"], h["wins"], h["losses"]) for h in t["head_to_head"]] == [("qvla", "rtn", 8, 0)]
    assert t["head_to_head"][0]["p"] == pytest.approx(2 / 256)
    assert "| W4A16 | qvla | rtn | +100.0 ± 0.0 | 8 / 0 | 0.008 |" in (tmp_path / "table.md").read_text()


def test_run_table_refuses_unknown_methods_and_bad_settings(tmp_path):
    with pytest.raises(KeyError, match="unknown methods \\['nope', 'nope\\+bc'\\]"):
        run_table("microvla-chunk", ["W4A16"], ["nope", "nope+bc", "rtn+bc"], 1, tmp_path)
    with pytest.raises(ValueError, match="not of the form"):
        run_table("microvla-chunk", ["W4"], ["rtn"], 1, tmp_path)
    assert not any(tmp_path.iterdir())


def test_run_table_refuses_rows_made_from_other_weights(tmp_path):
    """A resumed table never pairs the current policy with an FP run of different weights."""
    write_eval(tmp_path / "fp.json", {"e0": True}, weights_sha256="0" * 64)
    (tmp_path / "calib").mkdir()
    (tmp_path / "calib" / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="made from weights 000000000000, but the policy's weights are now .*use a new --out"):
        run_table("microvla-chunk", ["W4A16"], ["rtn"], 1, tmp_path)


def test_run_table_refuses_an_evaluation_of_another_checkpoint(tmp_path):
    """A kept row evaluation (results are kept in git, checkpoints are rebuilt) must be of the checkpoint now
    in the row's directory, or a stale result would be reused silently."""
    from qvla.checkpoint import WEIGHTS, sha256
    from qvla.policies import resolve

    from qvla.envs import get_suite

    source = sha256(resolve("microvla-chunk") / WEIGHTS)
    ids = {e.id: True for e in get_suite("mt10").episodes("eval", 1, 0)}
    write_eval(tmp_path / "fp.json", ids, weights_sha256=source)
    ckpt = tmp_path / "ckpt" / "w4a16-rtn"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps({"quantization": {"source_weights_sha256": source}}))
    (ckpt / WEIGHTS).write_bytes(b"rebuilt")
    write_eval(tmp_path / "eval-w4a16-rtn.json", ids, weights_sha256="0" * 64)
    with pytest.raises(ValueError, match="eval-w4a16-rtn.json was made from weights 000000000000, but .*w4a16-rtn holds "):
        run_table("microvla-chunk", ["W4A16"], ["rtn"], 1, tmp_path, calib=tmp_path / "calib")
    # of these weights but of other episodes (another --episodes-per-task or --seed): refused, not paired
    write_eval(tmp_path / "eval-w4a16-rtn.json", dict(list(ids.items())[:3]), weights_sha256=sha256(ckpt / WEIGHTS))
    with pytest.raises(ValueError, match="eval-w4a16-rtn.json holds other episodes than this run's"):
        run_table("microvla-chunk", ["W4A16"], ["rtn"], 1, tmp_path, calib=tmp_path / "calib")
    with pytest.raises(ValueError, match="fp.json holds other episodes"):
        run_table("microvla-chunk", ["W4A16"], ["rtn"], 1, tmp_path, calib=tmp_path / "calib", seed=1)
