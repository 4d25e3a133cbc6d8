"""Calibration episodes: one stored observation per policy call, tied to the policy's weights and the suite."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import qvla.calibrate
from qvla.calibrate import collect, load_calibration
from qvla.checkpoint import WEIGHTS, sha256
from qvla.quant.methods import QuantConfig
from qvla.quant.pipeline import quantize


@pytest.fixture(scope="module")
def calib(chunk_ckpt, tmp_path_factory):
    """One calibration episode of the random-init chunk policy, plus the rollout records it produced."""
    records = []

    def spy(*args, **kwargs):
        rec = rollout(*args, **kwargs)
        records.append(rec)
        return rec

    rollout = qvla.calibrate.rollout
    out = tmp_path_factory.mktemp("calib") / "mt10"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qvla.calibrate, "rollout", spy)
        manifest = collect(str(chunk_ckpt), "mt10", 1, out)
    return out, manifest, records


def test_manifest_records_suite_weights_and_calls(chunk_ckpt, calib):
    out, manifest, records = calib
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["format"] == "qvla-calib/1" and manifest["suite"] == "mt10" and manifest["seed"] == 0
    assert manifest["weights_sha256"] == sha256(chunk_ckpt / WEIGHTS)
    assert len(manifest["episodes"]) == 1 and len(records) == 1
    ep, rec = manifest["episodes"][0], records[0]
    assert ep["id"] == rec["id"] and ep["id"].startswith("mt10/") and "calib" in ep["id"]
    assert ep["calls"] == rec["policy_calls"] > 0 and ep["success"] == rec["success"]
    assert ep["calls"] == -(-rec["steps"] // 4)  # a 4-action chunk per call
    assert [p.name for p in (out / "episodes").iterdir()] == ["0000.npz"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".calib-")]  # no temp dir left behind


def test_load_calibration_returns_every_call(calib):
    out, manifest, _ = calib
    m, observations = load_calibration(out, suite="mt10")
    assert m == manifest and len(observations) == manifest["episodes"][0]["calls"]
    o = observations[-1]
    assert set(o.images) == {"third", "wrist"} and o.images["third"].shape == (96, 96, 3)
    assert o.images["third"].dtype == np.uint8 and o.proprio.shape == (4,)
    assert o.extras == {"episode": manifest["episodes"][0]["id"], "t": len(observations) - 1}
    assert o.instruction == manifest["episodes"][0]["instruction"] and o.task == manifest["episodes"][0]["task"]
    assert not np.array_equal(observations[0].images["third"], o.images["third"])  # the scene moved


def test_manifest_records_each_episodes_observation_digest(calib):
    out, manifest, _ = calib
    with np.load(out / manifest["episodes"][0]["file"]) as z:
        arrays = {k: z[k] for k in z.files}
    assert manifest["episodes"][0]["sha256"] == qvla.calibrate.observation_digest(arrays)
    arrays["proprio"] = arrays["proprio"] + 1e-6
    assert qvla.calibrate.observation_digest(arrays) != manifest["episodes"][0]["sha256"]


def test_load_calibration_refuses_observations_other_than_the_recorded(calib, tmp_path):
    """Regenerated observations (another machine, other code) next to a kept manifest are refused: the cached
    sensitivities and the checkpoints made from that directory came from the recorded ones."""
    out, manifest, _ = calib
    copy = tmp_path / "calib"
    shutil.copytree(out, copy)
    file = copy / manifest["episodes"][0]["file"]
    with np.load(file) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["third"][0, 0, 0, 0] ^= 1  # one pixel's lowest bit
    np.savez(file, **arrays)
    with pytest.raises(ValueError, match="holds other observations than its manifest recorded.*qvla calibrate"):
        load_calibration(copy)


def test_load_calibration_refuses_another_suite(calib):
    with pytest.raises(ValueError, match="from suite 'mt10', not 'other'"):
        load_calibration(calib[0], suite="other")


def test_load_calibration_refuses_a_non_calibration_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        load_calibration(tmp_path)


def test_collect_refuses_zero_episodes(chunk_ckpt, tmp_path):
    with pytest.raises(ValueError, match="--episodes must be >= 1, got 0"):
        collect(str(chunk_ckpt), "mt10", 0, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_quantize_refuses_calibration_from_another_checkpoint(calib, save_random_checkpoint, tmp_path):
    other = save_random_checkpoint("microvla-chunk", tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="collected with another policy"):
        quantize(str(other), QuantConfig(method="qvla", w_bits=4), calib[0], tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_quantize_refuses_calibration_from_another_suite(chunk_ckpt, calib, tmp_path):
    with pytest.raises(ValueError, match="not 'libero'"):
        quantize(str(chunk_ckpt), QuantConfig(method="qvla", w_bits=4), calib[0], tmp_path / "q", suite="libero")


def test_qvla_quantize_end_to_end_and_reuses_sensitivities(chunk_ckpt, calib, tmp_path, monkeypatch):
    from qvla.policies import load_policy
    from qvla.quant import pipeline

    import shutil

    short = shutil.copytree(calib[0], tmp_path / "calib")  # the first 8 calls keep the test short
    manifest = json.loads((short / "manifest.json").read_text())
    manifest["episodes"][0]["calls"] = 8
    (short / "manifest.json").write_text(json.dumps(manifest))
    cfg = QuantConfig(method="qvla", w_bits=3.0, no_prune=("lm_head", "action_head"))
    q = quantize(str(chunk_ckpt), cfg, short, tmp_path / "q")
    meta = json.loads((q / "config.json").read_text())["quantization"]
    assert meta["method"] == "qvla" and meta["average_bits"] <= 3.0 + 1e-9
    assert meta["source_weights_sha256"] == sha256(chunk_ckpt / WEIGHTS)
    policy = load_policy(q)
    assert policy.plan.provenance["calibration_episodes"] == 1
    assert len(policy.plan.provenance["sensitivity_file"]) and len(list(short.glob("sensitivity-*"))) == 1
    bits = np.concatenate([b.numpy() for b in policy.plan.bits.values()])
    assert len(set(bits.tolist())) > 1  # mixed precision
    assert policy.plan.provenance["sensitivity"]["observations"] == 8
    assert policy.act(load_calibration(short)[1][0]).shape == (4, 4)

    def no_recompute(*a, **k):
        raise AssertionError("sensitivities were recomputed instead of reused")

    monkeypatch.setattr(pipeline.S, "compute", no_recompute)
    again = quantize(str(chunk_ckpt), cfg, short, tmp_path / "q2")
    assert (again / WEIGHTS).read_bytes() == (q / WEIGHTS).read_bytes()


def test_qvla_rot_measures_rotated_sensitivities_and_never_folds_into_a_rotated_layer(chunk_ckpt, calib, tmp_path):
    import shutil

    from qvla.policies import load_policy
    from qvla.quant.plan import Plan

    short = shutil.copytree(calib[0], tmp_path / "calib")
    manifest = json.loads((short / "manifest.json").read_text())
    manifest["episodes"][0]["calls"] = 4
    (short / "manifest.json").write_text(json.dumps(manifest))
    path = quantize(str(chunk_ckpt), QuantConfig(method="qvla-rot", w_bits=4, a_bits=4), short, tmp_path / "q")
    plan = Plan.load(path)
    assert plan.method == "qvla-rot" and plan.transforms
    assert all("in_signs" in t for t in plan.transforms.values())
    assert [f.name.split("-")[3] for f in short.glob("sensitivity-*")] == ["rotation"]
    # real vs simulated at A16: a random-init policy amplifies A4's rounding differences (7-bit vs 4-bit grid)
    path = quantize(str(chunk_ckpt), QuantConfig(method="qvla-rot", w_bits=4), short, tmp_path / "q16")
    assert sorted(f.name.split("-")[2] for f in short.glob("sensitivity-*")) == ["a16", "a4"]
    real, sim = load_policy(path), load_policy(path, kernels="simulated")
    assert not any(getattr(m, "folded", False) for m in real.model.modules())
    o = load_calibration(short)[1][0]
    assert np.abs(real.act(o) - sim.act(o)).max() < 0.05
    # qvla-rot-gptq: the same rotated tables (no new file), GPTQ's weights on the same planned bits
    path = quantize(str(chunk_ckpt), QuantConfig(method="qvla-rot-gptq", w_bits=4), short, tmp_path / "g16")
    assert len(list(short.glob("sensitivity-*"))) == 2
    gptq = Plan.load(path)
    assert gptq.method == "qvla-rot-gptq" and all(torch.equal(gptq.bits[n], b) for n, b in Plan.load(tmp_path / "q16").bits.items())
    rounded = {n for n, b in gptq.bits.items() if ((b % 16) > 0).any()}
    convs = {n for n in rounded if n.startswith("vision.stem")}  # GPTQ'd on their patches, never rotated
    assert convs and all("weight" in gptq.transforms[n] and "in_signs" not in gptq.transforms[n] for n in convs)
    assert all({"in_signs", "weight"} <= set(gptq.transforms[n]) for n in rounded - convs)
    real, sim = load_policy(path), load_policy(path, kernels="simulated")
    assert np.abs(real.act(o) - sim.act(o)).max() < 0.05


def test_bias_corrected_checkpoint_loads_biases_onto_bias_free_layers(chunk_ckpt, calib, tmp_path):
    from qvla.policies import load_policy

    path = quantize(str(chunk_ckpt), QuantConfig(method="rtn+bc", w_bits=8), calib[0], tmp_path / "q")
    assert json.loads((path / "config.json").read_text())["quantization"]["method"] == "rtn+bc"
    real, sim = load_policy(path), load_policy(path, kernels="simulated")
    down = "llm.layers.0.mlp.down_proj"
    assert load_policy(str(chunk_ckpt)).model.get_submodule(down).bias is None
    assert real.model.get_submodule(down).bias is not None and sim.model.get_submodule(down).bias is not None
    o = load_calibration(calib[0])[1][0]
    assert np.abs(real.act(o) - sim.act(o)).max() < 0.02


def test_activation_clipped_checkpoint_keeps_its_ratios_on_both_kernel_paths(chunk_ckpt, calib, tmp_path):
    from qvla.policies import load_policy
    from qvla.quant.plan import Plan

    path = quantize(str(chunk_ckpt), QuantConfig(method="rtn+ac+bc", w_bits=8, a_bits=4), calib[0], tmp_path / "q")
    plan = Plan.load(path)
    assert plan.method == "rtn+ac+bc" and plan.provenance["a_clip"]
    ratios = {n: float(t["a_clip"]) for n, t in plan.transforms.items()}
    assert set(ratios) == set(plan.provenance["a_clip"]) and all(0.5 <= r <= 1 for r in ratios.values())
    assert min(ratios.values()) < 1  # at A4 some layers gain from clipping
    real, sim = load_policy(path), load_policy(path, kernels="simulated")
    for name, r in ratios.items():
        for p in (real, sim):
            assert float(p.model.get_submodule(name).inp["a_clip"]) == pytest.approx(r)
    o = load_calibration(calib[0])[1][0]
    clipped = sim.act(o)
    for name in ratios:  # the ratios take effect: without them the same checkpoint acts differently
        sim.model.get_submodule(name).inp["a_clip"] = torch.ones(1)
    assert np.abs(sim.act(o) - clipped).max() > 1e-4


def test_tied_swiglu_channels_share_bits_and_fold_into_the_down_projection(chunk_ckpt, calib, tmp_path):
    import shutil

    from qvla.policies import load_policy

    short = shutil.copytree(calib[0], tmp_path / "calib")
    manifest = json.loads((short / "manifest.json").read_text())
    manifest["episodes"][0]["calls"] = 4
    (short / "manifest.json").write_text(json.dumps(manifest))
    path = quantize(str(chunk_ckpt), QuantConfig(method="qvla", w_bits=3, tie=True), short, tmp_path / "q")
    real, sim = load_policy(path), load_policy(path, kernels="simulated")
    for gate, up in real.tied_channels():
        assert np.array_equal(real.plan.bits[gate], real.plan.bits[up])
        if len(set(real.plan.bits[gate].tolist())) > 1:
            assert real.model.get_submodule(gate).folded and real.model.get_submodule(up).folded
    assert any(real.model.get_submodule(g).folded for g, _ in real.tied_channels())
    o = load_calibration(short)[1][0]
    assert np.abs(real.act(o) - sim.act(o)).max() < 0.05


def test_layer_calibrated_plan_records_its_scales_and_the_plans_own_deviations(chunk_ckpt, calib, tmp_path):
    from qvla.quant.plan import Plan

    path = quantize(str(chunk_ckpt), QuantConfig(method="qvla+lc", w_bits=3), calib[0], tmp_path / "q")
    plan = Plan.load(path)
    assert plan.method == "qvla+lc" and plan.average_bits <= 3 + 1e-9
    meta = plan.provenance["sensitivity"]
    assert set(meta["layer_scale"]) == set(plan.bits) and min(meta["layer_scale"].values()) >= 1.0
    history = meta["layer_calibration"]["history"]
    assert [h["final"] for h in history] == [False, False, False, True]
    assert history[-1]["pruned"] == {n: int((plan.bits[n] == 0).sum()) for n in history[-1]["pruned"]}


def test_a_manifest_without_its_observations_is_refused_with_the_command_that_rebuilds_them(tmp_path):
    """Calibration manifests are kept in git and their observation files are not: a fresh clone has the first."""
    manifest = {"format": qvla.calibrate.FORMAT, "suite": "mt10", "seed": 0, "policy": "microvla-chunk",
                "episodes": [{"file": "episodes/0000.npz", "id": "x", "task": "reach", "instruction": "i",
                              "calls": 1, "success": True}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match="lacks 1 of its 1 observation files .*qvla calibrate --policy "
                                                "microvla-chunk --episodes 1"):
        load_calibration(tmp_path, "mt10")


def test_a_quantized_checkpoint_can_act_for_its_policy(chunk_ckpt, save_random_checkpoint, tmp_path, monkeypatch):
    """`qvla calibrate --acting Q`: the quantized checkpoint Q of the policy acts (its states), the manifest
    names the policy (whose sensitivities are measured on them) and records Q; a checkpoint that is not a
    quantized version of the policy is refused."""
    from qvla.policies import load_policy

    q = quantize(str(chunk_ckpt), QuantConfig(method="rtn", w_bits=4), None, tmp_path / "q")
    acted = []
    real_load = load_policy

    def spy(path, *a, **k):
        acted.append(str(path))
        return real_load(path, *a, **k)

    monkeypatch.setattr("qvla.policies.load_policy", spy)
    manifest = collect(str(chunk_ckpt), "mt10", 1, tmp_path / "c", acting=str(q))
    assert acted == [str(q)]  # the quantized checkpoint is the one rolled out (and the only one loaded)
    assert manifest["policy"] == real_load(chunk_ckpt).name
    assert manifest["weights_sha256"] == sha256(chunk_ckpt / WEIGHTS)
    assert manifest["acted_by"]["weights_sha256"] == sha256(q / WEIGHTS)
    assert manifest["acted_by"]["method"] == "rtn" and manifest["acted_by"]["w_bits"] == 4
    load_calibration(tmp_path / "c")  # and the policy's own pipeline takes it
    quantize(str(chunk_ckpt), QuantConfig(method="qvla", w_bits=8, no_prune=()), tmp_path / "c", tmp_path / "q8")
    other = save_random_checkpoint("microvla-chunk", tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="is not a quantized checkpoint of"):
        collect(str(chunk_ckpt), "mt10", 1, tmp_path / "c2", acting=str(other))
    assert not (tmp_path / "c2").exists()


def test_action_tuning_also_fits_the_steps_of_tune_on_directories(chunk_ckpt, calib, save_random_checkpoint, tmp_path):
    """`--tune-on DIR`: DIR's steps join the +at tuning (each of its episodes split on its own, holding out its
    --calib twin's segment), the plan's bits still come from --calib alone; refused without +at, for another
    policy's calibration, and for a directory given twice."""
    from qvla.policies import load_policy
    from qvla.quant import pipeline

    short = shutil.copytree(calib[0], tmp_path / "calib")
    manifest = json.loads((short / "manifest.json").read_text())
    manifest["episodes"][0]["calls"] = 8
    (short / "manifest.json").write_text(json.dumps(manifest))
    extra = shutil.copytree(short, tmp_path / "acted")
    manifest["episodes"][0]["calls"] = 6
    (extra / "manifest.json").write_text(json.dumps(manifest))
    weights = sha256(chunk_ckpt / WEIGHTS)
    steps, _ = pipeline.tuning_steps(str(chunk_ckpt), weights, short, [extra], "mt10")
    first = manifest["episodes"][0]["id"]
    assert [o.extras["episode"] for o in steps] == [f"tune0:{first}"] * 6
    assert all(o.extras["twin"] == first for o in steps)
    for again in ([short], [extra, extra]):
        with pytest.raises(ValueError, match="repeats"):
            pipeline.tuning_steps(str(chunk_ckpt), weights, short, again, "mt10")

    cfg = QuantConfig(method="qvla+at", w_bits=4, no_prune=("lm_head", "action_head"))
    plain = load_policy(quantize(str(chunk_ckpt), cfg, short, tmp_path / "q"))
    tuned = load_policy(quantize(str(chunk_ckpt), cfg, short, tmp_path / "q2", tune_on=[extra]))
    h = tuned.plan.provenance["action_tuning"]
    assert h["train_steps"] + h["held_out_steps"] == 14
    assert plain.plan.provenance["action_tuning"]["held_out_steps"] < h["held_out_steps"]  # both episodes hold out
    assert tuned.plan.provenance["tune_on"] == [{"calibration": str(extra), "episodes": 1, "steps": 6,
                                                 "acted_by": None, "ids": [first]}]
    assert json.loads((tmp_path / "q2" / "config.json").read_text())["quantization"]["tune_on"] == [str(extra)]
    assert len({int(b) for v in plain.plan.bits.values() for b in v}) > 1  # an allocation the steps could move
    assert all(torch.equal(plain.plan.bits[n], b) for n, b in tuned.plan.bits.items())
    with pytest.raises(ValueError, match="does not run"):
        quantize(str(chunk_ckpt), QuantConfig(method="qvla", w_bits=4), short, tmp_path / "q3", tune_on=[extra])
    other = save_random_checkpoint("microvla-chunk", tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="collected with another policy"):
        pipeline.tuning_steps(str(other), sha256(other / WEIGHTS), tmp_path / "none", [extra], "mt10")
    with pytest.raises(ValueError, match="not 'libero'"):
        pipeline.tuning_steps(str(chunk_ckpt), weights, short, [extra], "libero")
    assert not (tmp_path / "q3").exists()


def test_quantize_flushes_denormals_while_it_runs_and_restores_the_callers_mode(chunk_ckpt, tmp_path, monkeypatch):
    from qvla.cpu_mode import flushing_denormals
    from qvla.quant import pipeline

    seen = []
    save = pipeline.save_checkpoint
    monkeypatch.setattr(pipeline, "save_checkpoint", lambda *a, **k: (seen.append(flushing_denormals()), save(*a, **k)))
    torch.set_flush_denormal(False)
    quantize(str(chunk_ckpt), QuantConfig(method="rtn", w_bits=4), None, tmp_path / "q")
    assert seen == [True] and not flushing_denormals()
