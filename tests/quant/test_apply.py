"""quantize_ and the quantized checkpoint: exactness at 16 bits, SQNR by bits, pruning, refusals, reload.

Also the `qvla quantize` command's argument errors, which must stop before any work is done.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn

from qvla.checkpoint import WEIGHTS
from qvla.cli import main
from qvla.quant.apply import QuantConv2d, QuantLinear, layer_shapes, quantize_
from qvla.quant.methods import METHODS, QuantConfig
from qvla.quant.pipeline import quantize
from qvla.quant.plan import Plan, signature


def uniform_plan(policy, w_bits: int, a_bits: int = 16) -> Plan:
    return METHODS["rtn"](policy, QuantConfig(method="rtn", w_bits=w_bits, a_bits=a_bits))


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()))


@pytest.fixture
def images(toy_obs) -> torch.Tensor:
    return torch.stack(toy_obs)


def quantized_output(make_toy, images, w_bits: int, a_bits: int = 16, **toy) -> tuple[torch.Tensor, torch.Tensor]:
    policy = make_toy(**toy)
    with torch.no_grad():
        ref = policy.model(images)
        quantize_(policy, uniform_plan(policy, w_bits, a_bits))
        return ref, policy.model(images)


def test_16_bits_leaves_outputs_identical(make_toy, images):
    policy = make_toy()
    ref = policy.model(images).detach()
    quantize_(policy, uniform_plan(policy, 16))
    assert isinstance(policy.model[0], QuantConv2d) and isinstance(policy.model[3], QuantLinear)
    assert torch.equal(policy.model(images), ref)
    assert policy.plan.average_bits == 16


@pytest.mark.parametrize("a_bits, min_db", [(16, 30.0), (8, 30.0)])
def test_8_bits_loses_little(make_toy, images, a_bits, min_db):
    ref, out = quantized_output(make_toy, images, 8, a_bits)
    assert min_db < sqnr_db(ref, out) < 200  # close, but really quantized


def test_sqnr_falls_with_bits(make_toy, images):
    db = {b: sqnr_db(*quantized_output(make_toy, images, b)) for b in (8, 4, 2)}
    assert db[8] > db[4] > db[2]
    a4 = sqnr_db(*quantized_output(make_toy, images, 8, 4))
    assert a4 < sqnr_db(*quantized_output(make_toy, images, 8, 8))  # 4-bit activations cost more than 8


def test_pruned_channels_output_only_their_bias(make_toy, images):
    policy = make_toy()
    bits = {n: torch.full((m.weight.shape[0],), 8, dtype=torch.int8)
            for n, m in policy.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    pruned = [0, 3, 4]
    bits["5"][pruned] = 0
    plan = Plan(bits, {"0": 27, "3": 100, "5": 16}, policy.module_roles(), 16, 8.0, "test",
                signature(layer_shapes(policy.model, bits)))
    bias = policy.model[5].bias.detach().clone()
    quantize_(policy, plan)
    out = policy.model(images).detach()
    assert torch.equal(out[:, pruned], bias[pruned].expand(len(images), -1))
    kept = [1, 2, 5]
    assert (out[:, kept] != bias[kept]).all()


def test_plan_for_another_shape_is_refused(make_toy):
    plan = uniform_plan(make_toy(hidden=16), 4)
    with pytest.raises(ValueError, match="another model"):
        quantize_(make_toy(hidden=12), plan)


def test_plan_for_other_layer_names_is_refused(make_toy):
    plan = uniform_plan(make_toy(), 4)
    other = make_toy()
    other.model = nn.Sequential(OrderedDict((f"m{n}", m) for n, m in other.model.named_children()))
    with pytest.raises(ValueError, match=r"another model .*layers not in this model: \['0', '3', '5'\]"):
        quantize_(other, plan)
    assert not any(isinstance(m, QuantLinear) for m in other.model.modules())  # refused before any swap


def test_plan_with_a_forged_signature_is_refused(make_toy):
    policy = make_toy()
    plan = uniform_plan(policy, 4)
    plan.signature = "0" * 16
    with pytest.raises(ValueError, match="another model"):
        quantize_(policy, plan)


# ---- the quantized checkpoint (real micro-VLA) ----

@pytest.fixture(scope="module")
def rtn4(chunk_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "rtn4"
    return quantize(str(chunk_ckpt), QuantConfig(method="rtn", w_bits=4), None, out)


def test_quantized_checkpoint_reloads_to_the_same_actions(chunk_ckpt, rtn4, random_observation):
    from qvla.policies import load_policy

    fp = load_policy(chunk_ckpt)
    obs = [random_observation(s) for s in range(3)]
    fp_actions = [fp.act(o) for o in obs]
    quantize_(fp, uniform_plan(fp, 4))
    loaded = load_policy(rtn4, kernels="simulated")  # the real-kernel path: test_packed.py
    assert loaded.plan.average_bits == 4.0 and loaded.plan.signature == fp.plan.signature
    for o, ref in zip(obs, fp_actions):
        a = loaded.act(o)
        assert np.array_equal(a, fp.act(o))
        assert not np.array_equal(a, ref)  # and it is not the full-precision policy
    n_quant = sum(isinstance(m, QuantLinear) for m in loaded.model.modules())
    assert n_quant == len(loaded.plan.bits) > 0


def test_quantized_checkpoint_is_smaller(chunk_ckpt, rtn4):
    assert (rtn4 / WEIGHTS).stat().st_size < 0.6 * (chunk_ckpt / WEIGHTS).stat().st_size


@pytest.mark.parametrize("victim", [WEIGHTS, "plan.safetensors", "plan.json"])
def test_tampered_quantized_checkpoint_is_refused(tmp_path, rtn4, victim):
    import shutil

    from qvla.policies import load_policy

    ckpt = shutil.copytree(rtn4, tmp_path / "q")
    data = bytearray((ckpt / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (ckpt / victim).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"checksum mismatch for {victim}"):
        load_policy(ckpt)


def test_a_quantized_checkpoint_is_not_quantized_again(tmp_path, rtn4):
    (tmp_path / "calib").mkdir()
    with pytest.raises(ValueError, match="already quantized"):
        quantize(str(rtn4), QuantConfig(method="qvla", w_bits=4), tmp_path / "calib", tmp_path / "out")


# ---- `qvla quantize` argument errors ----

@pytest.mark.parametrize("extra, message", [
    (["--w-bits", "0"], "--w-bits (average bits per weight) must be in (0, 16], got 0.0"),
    (["--w-bits", "17"], "--w-bits (average bits per weight) must be in (0, 16], got 17.0"),
    (["--w-bits", "4", "--method", "nope"], f"unknown method 'nope'; available: {sorted(METHODS)}"),
    (["--w-bits", "4", "--keep", "lm_head=3"], "pin lm_head=3: bits must be one of (0, 2, 4, 8, 16)"),
    (["--w-bits", "4", "--keep", "lm_head"], "--keep expects ROLE=BITS or re:REGEX=BITS, got 'lm_head'"),
    (["--w-bits", "4"], "method qvla needs --calib"),
    (["--w-bits", "3", "--method", "rtn"], "rtn needs integer --w-bits in (2, 4, 8, 16), got 3.0"),
    (["--w-bits", "4", "--method", "smoothquant", "--alpha", "1.5"],
     "--alpha (SmoothQuant's migration strength) must be in [0, 1], got 1.5"),
])
def test_quantize_cli_refuses_bad_arguments(capsys, tmp_path, chunk_ckpt, extra, message):
    out = tmp_path / "out"
    assert main(["quantize", "--policy", str(chunk_ckpt), "--out", str(out)] + extra) == 2
    err = capsys.readouterr().err
    assert "qvla quantize: error:" in err and message in err, err
    assert "Traceback" not in err and not out.exists()
