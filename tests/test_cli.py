"""The command line: bad arguments end with exit status 2, one clear message, and no output files."""
from __future__ import annotations

import json
import os

import pytest

from qvla.checkpoint import WEIGHTS
from qvla.cli import main
from qvla.policies import load_policy


def run_refused(capsys, argv: list[str], message: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"qvla {argv[0]}: error:" in err and message in err, err
    assert "Traceback" not in err
    return err


@pytest.fixture
def eval_args(chunk_ckpt, tmp_path):
    """Valid `qvla eval` arguments for one short episode; each test breaks exactly one of them."""
    return {"--policy": str(chunk_ckpt), "--suite": "mt10", "--episodes-per-task": "1", "--tasks": "reach",
            "--out": str(tmp_path / "r.json")}


def argv(command: str, args: dict[str, str]) -> list[str]:
    return [command] + [x for kv in args.items() for x in kv]


@pytest.mark.parametrize("key, value, message", [
    ("--suite", "libero", "unknown suite 'libero'; available suites: ['mt10']"),
    ("--policy", "openvla-7b", "'openvla-7b' is neither a registered policy"),
    ("--episodes-per-task", "0", "episodes per task must be a positive integer, got 0"),
    ("--tasks", "fly", "unknown task 'fly'"),
])
def test_eval_refuses_bad_arguments(capsys, tmp_path, eval_args, key, value, message):
    run_refused(capsys, argv("eval", {**eval_args, key: value}), message)
    assert not list(tmp_path.iterdir())


def test_eval_refuses_out_in_missing_directory(capsys, tmp_path, eval_args):
    out = tmp_path / "nope" / "r.json"
    run_refused(capsys, argv("eval", {**eval_args, "--out": str(out)}), f"directory {out.parent} does not exist")
    assert not list(tmp_path.iterdir())


def test_eval_refuses_out_under_a_file(capsys, tmp_path, eval_args):
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / "file.txt" / "r.json"
    run_refused(capsys, argv("eval", {**eval_args, "--out": str(out)}), f"cannot write {out}")
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_eval_refuses_unwritable_directory(capsys, tmp_path, eval_args):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        run_refused(capsys, argv("eval", {**eval_args, "--out": str(locked / "r.json")}), "permission denied")
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


def test_eval_refuses_corrupted_checkpoint_before_running(capsys, tmp_path, save_random_checkpoint, eval_args):
    ckpt = save_random_checkpoint("microvla-chunk", tmp_path / "ckpt")
    (ckpt / WEIGHTS).write_bytes((ckpt / WEIGHTS).read_bytes()[:-1] + b"\x00")
    run_refused(capsys, argv("eval", {**eval_args, "--policy": str(ckpt)}), "checksum mismatch")
    assert not (tmp_path / "r.json").exists()


def test_eval_runs_and_prints_a_table(capsys, tmp_path, eval_args):
    assert main(argv("eval", eval_args)) == 0
    out = capsys.readouterr().out
    assert "| reach |" in out and "microvla-chunk" in out
    assert json.loads((tmp_path / "r.json").read_text())["episodes"] == 1
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 1


def test_train_refuses_unknown_policy(capsys, tmp_path, demo_dir):
    run_refused(capsys, ["train", "--policy", "openvla-7b", "--data", str(demo_dir), "--out", str(tmp_path / "o")],
                "unknown policy 'openvla-7b'; registered policies:")
    assert not list(tmp_path.iterdir())


def test_train_refuses_a_non_demo_directory(capsys, tmp_path):
    run_refused(capsys, ["train", "--policy", "microvla-token", "--data", str(tmp_path), "--out",
                         str(tmp_path / "o")], "is not a demo directory")
    assert not (tmp_path / "o").exists()


def test_train_writes_a_loadable_checkpoint(capsys, tmp_path, demo_dir):
    out = tmp_path / "o"
    assert main(["train", "--policy", "microvla-token", "--data", str(demo_dir), "--out", str(out),
                 "--steps", "2", "--batch-size", "2", "--threads", "1", "--shift", "2"]) == 0
    assert f"trained microvla-token -> {out}" in capsys.readouterr().out
    assert load_policy(out).name == "microvla-token"
    assert json.loads((out / "config.json").read_text())["training"]["shift"] == 2


def test_demos_refuse_bad_count_and_non_empty_out(capsys, tmp_path):
    run_refused(capsys, ["demos", "--per-task", "0", "--out", str(tmp_path / "d")], "positive integer")
    assert not list(tmp_path.iterdir())
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep").write_text("x")
    run_refused(capsys, ["demos", "--per-task", "1", "--out", str(tmp_path / "d")], "is not empty")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["keep"]


def test_demos_needs_one_mode(capsys, tmp_path):
    run_refused(capsys, ["demos"], "needs --per-task and --out")
    run_refused(capsys, ["demos", "--add-state", str(tmp_path), "--out", str(tmp_path / "x")], "drop --out")


def test_table_needs_a_policy_unless_it_only_rewrites(capsys, tmp_path):
    from tests.test_table import write_eval

    run_refused(capsys, ["table", "--out", str(tmp_path)], "--policy is required (unless --rewrite)")
    assert not any(tmp_path.iterdir())
    write_eval(tmp_path / "fp.json", {"e0": True, "e1": False})
    (tmp_path / "table.json").write_text(json.dumps({"policy": "p", "episodes_per_task": 1, "rows": []}))
    assert main(["table", "--rewrite", "--out", str(tmp_path)]) == 0
    assert "| FP | — | 100 | 0 | 50.0 |" in (tmp_path / "table.md").read_text()


def test_select_refuses_a_candidate_that_is_not_a_quantized_checkpoint(capsys, chunk_ckpt, tmp_path):
    run_refused(capsys, ["select", "--policy", str(chunk_ckpt), "--candidates", str(chunk_ckpt), "--out",
                         str(tmp_path / "s")], "is not a quantized checkpoint of")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("argv, expected", [
    ([], None),  # the budget's default (QuantConfig.NO_PRUNE_BELOW)
    (["--no-prune"], []),  # every role may prune
    (["--no-prune", "vision", "llm"], ["vision", "llm"]),
])
def test_quantize_no_prune_default_is_distinct_from_an_empty_list(argv, expected):
    from qvla.cli import build_parser

    a = build_parser().parse_args(["quantize", "--policy", "p", "--w-bits", "3", "--out", "o", *argv])
    assert a.no_prune == expected


def test_quantize_passes_the_smoothquant_alpha_to_the_config(monkeypatch, tmp_path):
    from qvla.cli import main

    seen = {}

    def fake_quantize(policy, cfg, calib, out, suite, tune_on=None):
        seen["cfg"] = cfg
        (tmp_path / "config.json").write_text(json.dumps({"quantization": {"average_bits": 4.0}}))
        return tmp_path

    monkeypatch.setattr("qvla.quant.pipeline.quantize", fake_quantize)
    assert main(["quantize", "--policy", "p", "--method", "smoothquant", "--w-bits", "4", "--a-bits", "4",
                 "--alpha", "0.8", "--calib", "c", "--out", str(tmp_path)]) == 0
    assert seen["cfg"].alpha == 0.8 and seen["cfg"].method == "smoothquant"
