"""qvla select: the choice by closed-loop success, on calib episodes no candidate was calibrated on."""
from __future__ import annotations

import json

import pytest

from qvla.calibrate import collect
from qvla.checkpoint import WEIGHTS, sha256
from qvla.quant.methods import QuantConfig
from qvla.quant.pipeline import quantize
from qvla.select import calibration_ids, choose, run_select


def recs(successes: list[bool], errors: tuple[int, ...] = ()) -> dict:
    return {f"e{k}": {"success": s, "error": "boom" if k in errors else None} for k, s in enumerate(successes)}


def test_choose_takes_the_most_successes_and_the_first_listed_on_a_tie():
    a, b, c = recs([True, False, False, True]), recs([True, True, True, False]), recs([False, True, True, True])
    assert choose([a, b, c]) == 1  # b and c tie on 3: the first listed
    assert choose([a, c, b]) == 1
    assert choose([a, recs([True] * 4)]) == 1


@pytest.fixture(scope="module")
def candidates(chunk_ckpt, tmp_path_factory):
    """Two quantized checkpoints of the random-init chunk policy, calibrated on one calib episode (seed 0)."""
    root = tmp_path_factory.mktemp("select")
    calib = root / "calib"
    collect(str(chunk_ckpt), "mt10", 1, calib)
    made = [quantize(str(chunk_ckpt), QuantConfig(method=m, w_bits=w), calib, root / f"q{k}")
            for k, (m, w) in enumerate([("rtn", 4), ("qvla", 8)])]
    return calib, made


def test_calibration_ids_are_the_episodes_the_plan_was_made_on(candidates):
    calib, (q0, q1) = candidates
    ids = {e["id"] for e in json.loads((calib / "manifest.json").read_text())["episodes"]}
    assert calibration_ids(q1) == ids and len(ids) == 1
    assert json.loads((q1 / "plan.json").read_text())["provenance"]["calibration_ids"] == sorted(ids)
    assert calibration_ids(q0) == set()  # rtn reads no calibration: nothing to overlap


def _plan_with(ckpt, tmp_path, **prov):
    """A copy of ckpt's plan.json with its provenance changed (what older or tuned plans record)."""
    d = tmp_path / "ck"
    d.mkdir(exist_ok=True)
    meta = json.loads((ckpt / "plan.json").read_text())
    meta["provenance"] = {k: v for k, v in {**meta["provenance"], **prov}.items() if v is not None}
    (d / "plan.json").write_text(json.dumps(meta))
    return d


def test_calibration_ids_of_older_plans_tuned_plans_and_methods_without_calibration(candidates, tmp_path):
    calib, (_, q1) = candidates
    ids = calibration_ids(q1)
    # a plan written before the ids were recorded: its calibration folder's manifest is read
    assert calibration_ids(_plan_with(q1, tmp_path, calibration_ids=None)) == ids
    with pytest.raises(FileNotFoundError, match="whose manifest.json is missing"):
        calibration_ids(_plan_with(q1, tmp_path, calibration_ids=None, calibration=str(tmp_path / "gone")))
    # --tune-on steps count as calibration too, recorded or read from their folder
    tuned = _plan_with(q1, tmp_path, tune_on=[{"calibration": "x", "ids": ["mt10/reach/calib/s7/0"]},
                                              {"calibration": str(calib)}])
    assert calibration_ids(tuned) == ids | {"mt10/reach/calib/s7/0"}
    assert calibration_ids(_plan_with(q1, tmp_path, calibration=None, calibration_ids=None)) == set()
    with pytest.raises(FileNotFoundError, match="no plan.json"):
        calibration_ids(calib)


def test_select_refuses_the_calibration_episodes_before_acting(chunk_ckpt, candidates, tmp_path):
    """Seed 0 of the calib split holds the candidates' calibration episode: no episode may score a plan on
    the layouts it was measured on."""
    _, made = candidates
    with pytest.raises(ValueError, match="was calibrated on 1 of the selection episodes"):
        run_select(str(chunk_ckpt), [str(q) for q in made], 1, tmp_path / "s", seed=0, tasks=["reach"])
    assert not (tmp_path / "s").exists()


def test_select_refuses_another_policys_checkpoint(chunk_ckpt, candidates, save_random_checkpoint, tmp_path):
    other = save_random_checkpoint("microvla-chunk", tmp_path / "other", seed=3)
    _, made = candidates
    with pytest.raises(ValueError, match="is not a quantized checkpoint of"):
        run_select(str(other), [str(made[0])], 1, tmp_path / "s", seed=5)
    with pytest.raises(ValueError, match="distinct"):
        run_select(str(chunk_ckpt), [str(made[0])] * 2, 1, tmp_path / "s", seed=5)


def test_select_evaluates_every_candidate_on_the_same_calib_episodes(chunk_ckpt, candidates, tmp_path, monkeypatch):
    _, made = candidates
    res = run_select(str(chunk_ckpt), [str(q) for q in made], 1, tmp_path / "s", seed=5, tasks=["reach", "push"])
    fp = json.loads((tmp_path / "s" / "fp.json").read_text())
    assert fp["split"] == "calib" and fp["seed"] == 5 and fp["episodes"] == 2
    ids = [json.loads(line)["id"] for line in (tmp_path / "s" / "cand-1.jsonl").read_text().splitlines()]
    assert ids == ["mt10/reach/calib/s5/0", "mt10/push/calib/s5/0"]
    assert res["chosen"] == str(made[res["chosen_index"]])
    assert [r["method"] for r in res["candidates"]] == ["rtn", "qvla"]
    assert res["candidates"][res["chosen_index"]]["vs_chosen"] is None
    assert all(r["weights_sha256"] == sha256(q / WEIGHTS) for r, q in zip(res["candidates"], made))
    assert json.loads((tmp_path / "s" / "selection.json").read_text()) == res
    # a rerun reuses the evaluations (nothing acts again); one asked on other episodes is refused, not mixed in
    monkeypatch.setattr("qvla.evaluate.evaluate", lambda *a, **k: pytest.fail("a kept evaluation was redone"))
    assert run_select(str(chunk_ckpt), [str(q) for q in made], 1, tmp_path / "s", seed=5, tasks=["reach", "push"]) == res
    with pytest.raises(ValueError, match="holds other episodes"):
        run_select(str(chunk_ckpt), [str(q) for q in made], 1, tmp_path / "s", seed=5, tasks=["reach"])
    with pytest.raises(ValueError, match="empty task list"):
        run_select(str(chunk_ckpt), [str(q) for q in made], 1, tmp_path / "s", seed=5, tasks=[])
    # listed the other way round, each cand-<k> file now belongs to the other checkpoint's weights
    with pytest.raises(ValueError, match="cand-0.json was made from weights .* holds"):
        run_select(str(chunk_ckpt), [str(q) for q in made[::-1]], 1, tmp_path / "s", seed=5, tasks=["reach", "push"])


def test_select_makes_no_choice_on_crashed_episodes(chunk_ckpt, candidates, tmp_path):
    """A crashed episode is an error, not a failure: the selection stops and names it."""
    _, made = candidates
    out = tmp_path / "s"
    run_select(str(chunk_ckpt), [str(made[0])], 1, out, seed=5, tasks=["reach"])
    summary = json.loads((out / "cand-0.json").read_text())
    rec = json.loads((out / "cand-0.jsonl").read_text())
    rec.update(error="RuntimeError: sim diverged", traceback="...")
    (out / "cand-0.jsonl").write_text(json.dumps(rec) + "\n")
    summary["errors"] = [{"id": rec["id"], "error": rec["error"], "traceback": "..."}]
    (out / "cand-0.json").write_text(json.dumps(summary))
    with pytest.raises(RuntimeError, match="episodes crashed during selection"):
        run_select(str(chunk_ckpt), [str(made[0])], 1, out, seed=5, tasks=["reach"])
