"""Each baseline's defining property on a small layer, and every registered baseline end to end on the toy
policy (plan with transforms -> quantize_ -> outputs close to full precision) and through a checkpoint."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from qvla.quant.apply import QuantLinear, quantize_
from qvla.quant.methods import METHODS, NEEDS, QuantConfig
from qvla.quant.methods.awq import output_error, search_clip, search_scale
from qvla.quant.methods.gptq import gptq_quantize, gptq_transform, output_matched
from qvla.quant.methods.omniquant import train_layer
from qvla.quant.methods.smoothquant import smooth_scales
from qvla.quant.primitives import fake_quant_activation, fake_quant_mixed, fake_quant_rows


def layer_and_inputs(n: int = 24, k: int = 32, rows: int = 512, seed: int = 0):
    """A Linear layer and correlated inputs with a few outlier channels, as transformer activations have."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) / math.sqrt(k))
        lin.bias.copy_(torch.randn(n, generator=g) * 0.1)
    mix = torch.randn(k, k, generator=g) / math.sqrt(k) + torch.eye(k)
    x = torch.randn(rows, k, generator=g) @ mix
    x[:, :3] *= 20.0  # outlier channels
    return lin, x


def out_err(lin: nn.Linear, q: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((q(x) - lin(x)).pow(2).sum())


def test_smoothquant_leaves_the_float_output_unchanged():
    lin, x = layer_and_inputs()
    s = smooth_scales(x.abs().amax(0), lin.weight.detach(), 0.5)
    smoothed = QuantLinear.from_linear(lin, torch.full((24,), 16), 16, {"in_scale": s})
    assert out_err(lin, smoothed, x) / float(lin(x).pow(2).sum()) < 1e-10
    assert not torch.allclose(s, torch.ones_like(s))  # and it did move something


def test_smoothquant_flattens_activations_and_helps_w8a8():
    lin, x = layer_and_inputs()
    s = smooth_scales(x.abs().amax(0), lin.weight.detach(), 0.5)
    spread = lambda t: float(t.abs().amax(0).max() / t.abs().amax(0).median())  # noqa: E731
    assert spread(x / s) < spread(x)
    rtn = QuantLinear.from_linear(lin, torch.full((24,), 8), 8)
    sq = QuantLinear.from_linear(lin, torch.full((24,), 8), 8, {"in_scale": s})
    assert out_err(lin, sq, x) < out_err(lin, rtn, x)


def test_omniquant_equivalent_transform_is_exact_in_float():
    lin, x = layer_and_inputs()
    t = {"in_scale": torch.rand(32) + 0.5, "in_shift": torch.randn(32)}
    moved = QuantLinear.from_linear(lin, torch.full((24,), 16), 16, t)
    assert out_err(lin, moved, x) / float(lin(x).pow(2).sum()) < 1e-10


@pytest.mark.parametrize("bits, a_bits", [(4, 16), (4, 4), (2, 16)])
def test_awq_scale_search_never_does_worse_than_alpha_zero(bits, a_bits):
    lin, x = layer_and_inputs()
    w = lin.weight.detach()
    s, alpha = search_scale(x, w, bits, a_bits)
    assert 0.0 <= alpha <= 1.0
    assert output_error(x, w, bits, a_bits, s).sum() <= output_error(x, w, bits, a_bits, torch.ones(32)).sum()


def test_awq_clip_search_never_does_worse_than_no_clipping():
    lin, x = layer_and_inputs()
    w = lin.weight.detach()
    s, _ = search_scale(x, w, 4)
    clip = search_clip(x, w, 4, 16, s)
    assert ((clip > 0.49) & (clip <= 1.0)).all()
    assert (output_error(x, w, 4, 16, s, clip) <= output_error(x, w, 4, 16, s) + 1e-6).all()


@pytest.mark.parametrize("a_bits", [16, 4])
def test_awq_searches_at_mixed_bits_help_and_are_what_the_layer_applies(a_bits):
    """qvla-awq runs AWQ's searches on a QVLA plan's mixed rows: never worse than no scaling, rows kept at
    16 bits stay exact (weight-only), and the quantized layer built from the result has the searched error."""
    lin, x = layer_and_inputs()
    w = lin.weight.detach()
    bits = torch.tensor([16, 8, 4, 4, 2, 0] * 4)
    s, _ = search_scale(x, w, bits, a_bits)
    clip = search_clip(x, w, bits, a_bits, s)
    err = output_error(x, w, bits, a_bits, s, clip)
    assert err.sum() <= output_error(x, w, bits, a_bits, torch.ones(32)).sum()
    if a_bits == 16:
        assert float(err[bits == 16].max()) < 1e-6 * float(x.pow(2).sum())
    layer = QuantLinear.from_linear(lin, bits, a_bits, {"in_scale": s, "clip": clip})
    assert out_err(lin, layer, x) == pytest.approx(float(err.sum()), rel=1e-3)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_gptq_error_is_no_larger_than_rtn(bits):
    lin, x = layer_and_inputs(rows=1024)
    w = lin.weight.detach()
    q, scale, zero = gptq_quantize(w, 2 * x.t().double() @ x.double() / len(x), bits)
    err = lambda wq: float((x @ (wq - w).t()).pow(2).sum())  # noqa: E731
    assert err(q) <= err(fake_quant_rows(w, bits))
    qmax = 127 if bits == 8 else 2**bits - 1  # and GPTQ's weights lie on their grid
    codes = q / scale[:, None] + zero[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-3) and codes.round().abs().max() <= qmax


@pytest.mark.parametrize("a_bits", [8, 4])
def test_output_matched_gptq_is_closer_to_full_precision_with_rounded_activations(a_bits):
    """qvla-rot-gptaq's GPTQ: the least-squares weight splits the error against the FP output into its own
    residual plus the rounding's error on the rounded inputs (orthogonality, up to the damping), and GPTQ on
    it ends closer to W x than GPTQ of W alone, with the layer's activations rounded as it runs."""
    lin, x = layer_and_inputs(rows=1024)
    w = lin.weight.detach()
    seen = fake_quant_activation(x, a_bits)
    fp = x @ w.t()
    err = lambda v: float((fp - seen @ v.t()).pow(2).sum())  # noqa: E731
    assert torch.allclose(output_matched(w, x, x, damp=0.0), w, atol=1e-4)  # nothing to match: W itself
    matched = output_matched(w, x, seen, damp=0.0)
    v = fake_quant_rows(w, 4)
    assert err(v) == pytest.approx(err(matched) + float(((matched - v) @ seen.t()).pow(2).sum()), rel=1e-4)
    plain = gptq_transform(x, w, 4)["weight"]
    aware = gptq_transform(x, w, 4, x_seen=seen)["weight"]
    assert err(aware) < err(plain)


def test_gptq_checkpoint_reproduces_its_codes():
    lin, x = layer_and_inputs()
    w = lin.weight.detach()
    q, scale, zero = gptq_quantize(w, x.t().double() @ x.double(), 4)
    layer = QuantLinear.from_linear(lin, torch.full((24,), 4), 16, {"weight": q, "grid_scale": scale, "grid_zero": zero})
    assert torch.allclose(layer.weight, q, atol=1e-6)


def test_omniquant_training_beats_rtn_at_w4a4():
    lin, x = layer_and_inputs()
    t = train_layer(x, lin.weight, lin.bias, 4, 4, steps=60)
    assert set(t) == {"in_scale", "in_shift", "clip", "clip_lo"}
    trained = QuantLinear.from_linear(lin, torch.full((24,), 4), 4, t)
    rtn = QuantLinear.from_linear(lin, torch.full((24,), 4), 4)
    assert out_err(lin, trained, x) < out_err(lin, rtn, x)


@pytest.mark.parametrize("a_bits", [16, 4])
def test_omniquant_training_at_mixed_bits_beats_plain_rounding(a_bits):
    """qvla-omni trains OmniQuant's clipping and equivalent transform on a QVLA plan's mixed rows: the
    layer it gives is closer to the float one than the plan's plain rounding, and weight-only rows kept
    at 16 bits stay exact (the equivalent transform is exact in float)."""
    lin, x = layer_and_inputs()
    bits = torch.tensor([16, 8, 4, 4, 2, 0] * 4)
    t = train_layer(x, lin.weight, lin.bias, bits, a_bits, steps=60)
    trained = QuantLinear.from_linear(lin, bits, a_bits, t)
    plain = QuantLinear.from_linear(lin, bits, a_bits)
    assert out_err(lin, trained, x) < out_err(lin, plain, x)
    if a_bits == 16:
        with torch.no_grad():
            kept = (trained(x) - lin(x))[:, bits == 16]
        assert float(kept.pow(2).sum()) < 1e-8 * float(lin(x).pow(2).sum())


BASELINES = [m for m, need in NEEDS.items() if need == "observations"]


@pytest.mark.parametrize("method", BASELINES)
@pytest.mark.parametrize("w_bits, a_bits", [(8, 8), (4, 16)])
def test_every_baseline_quantizes_the_toy_policy_close_to_full_precision(make_toy, toy_obs, method, w_bits, a_bits):
    policy = make_toy()
    images = torch.stack(toy_obs)
    with torch.no_grad():
        ref = policy.model(images)
    plan = METHODS[method](policy, QuantConfig(method=method, w_bits=w_bits, a_bits=a_bits), toy_obs)
    assert plan.method == method and plan.average_bits == w_bits and plan.transforms
    quantize_(policy, plan)
    with torch.no_grad():
        out = policy.model(images)
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum())
    assert sqnr > (30 if w_bits == 8 else 15)


def test_transforms_survive_the_checkpoint_and_run_on_real_kernels():
    from qvla.quant.packed import PackedLinear

    lin, x = layer_and_inputs()
    t = train_layer(x, lin.weight, lin.bias, 4, 8, steps=20)
    sim = QuantLinear.from_linear(lin, torch.full((24,), 4), 8, t)
    real = PackedLinear(sim.storage(), lin.weight.shape, sim.bias, 8)
    with torch.no_grad():
        ref, out = sim(x), real(x)
    assert 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()) > 25
    assert fake_quant_activation(x, 8).shape == x.shape


def test_unknown_transform_key_is_refused():
    lin, _ = layer_and_inputs()
    with pytest.raises(ValueError, match="unknown transform keys"):
        QuantLinear.from_linear(lin, torch.full((24,), 4), 16, {"scales": torch.ones(32)})


@pytest.mark.parametrize("a_bits", [16, 4])
def test_bias_correction_removes_the_mean_output_error(make_toy, toy_obs, a_bits):
    """Defining property: on the calibration inputs, the corrected layer's mean output error is zero."""
    from qvla.quant.bias_correction import bias_corrections, correct_biases
    from qvla.quant.layer_inputs import collect_inputs

    policy = make_toy()
    plan = METHODS["rtn"](policy, QuantConfig(method="rtn", w_bits=2, a_bits=a_bits), None, {})
    mods = dict(policy.model.named_modules())
    x = collect_inputs(policy, toy_obs, ["3", "5"], max_rows=8192)
    d = bias_corrections(policy, plan, toy_obs)
    assert set(d) == {"3", "5"}  # Linear layers only
    with torch.no_grad():
        for n in d:
            plain = QuantLinear.from_linear(mods[n], plan.bits[n].long(), a_bits)
            fixed = QuantLinear.from_linear(mods[n], plan.bits[n].long(), a_bits, {"bias_add": d[n]})
            before = (plain(x[n]) - mods[n](x[n])).mean(0)
            after = (fixed(x[n]) - mods[n](x[n])).mean(0)
            assert after.abs().max() < 1e-5 < before.abs().max()
    assert correct_biases(policy, plan, toy_obs).method == "rtn+bc" and "bias_add" in plan.transforms["5"]


def test_bias_correction_suffix_parses_and_needs_calibration(tmp_path, chunk_ckpt):
    from qvla.quant.pipeline import quantize

    cfg = QuantConfig(method="qvla+bc", w_bits=4)
    assert cfg.method == "qvla" and cfg.bias_correct
    with pytest.raises(ValueError, match=r"bias correction \(\+bc\) of rtn needs --calib"):
        quantize(str(chunk_ckpt), QuantConfig(method="rtn+bc", w_bits=4), None, tmp_path / "q")
    with pytest.raises(KeyError, match="unknown method 'nope'"):
        QuantConfig(method="nope+bc")


def test_gptq_at_mixed_bits_is_gptq_row_by_row():
    """Per-row widths: each row is what uniform GPTQ at that row's width makes of it, rows at 16 stay exact,
    pruned rows are zero, and the layer's error is no larger than rounding each row to its width."""
    lin, x = layer_and_inputs(rows=1024)
    w, h = lin.weight.detach(), 2 * x.t().double() @ x.double() / len(x)
    bits = torch.tensor([8, 4, 2, 16, 0, 4] * 4)
    q, scale, zero = gptq_quantize(w, h, bits)
    for b in (8, 4, 2):
        rows = bits == b
        assert torch.allclose(q[rows], gptq_quantize(w, h, b)[0][rows], atol=1e-5)
    assert torch.equal(q[bits == 16], w[bits == 16]) and not q[bits == 0].any()
    err = lambda wq: float((x @ (wq - w).t()).pow(2).sum())  # noqa: E731
    assert err(q) < err(fake_quant_mixed(w, bits))
    layer = QuantLinear.from_linear(lin, bits, 16, {"weight": q, "grid_scale": scale, "grid_zero": zero})
    assert torch.allclose(layer.weight, q, atol=1e-6)  # the checkpoint keeps GPTQ's codes at every width
    with pytest.raises(ValueError, match="bits must be one of"):
        gptq_quantize(w, h, torch.full((24,), 3))


@pytest.mark.parametrize("bits", [4, 2])
def test_gptq_grid_search_is_never_worse_than_min_max(bits):
    """The searched range rounds every row at least as well as min-max on the search's own measure, and
    strictly better on a row whose range one outlier sets."""
    from qvla.quant.methods.gptq import NORM, searched_grid
    from qvla.quant.primitives import quant_params, quantize_rows, dequantize_rows

    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    w[0, 0] = 12.0
    err = lambda grid: (dequantize_rows(*quantize_rows(w, bits, grid=grid)) - w).abs().pow(NORM).sum(1)  # noqa: E731
    s, z, _, _ = quant_params(w, bits)
    searched, minmax = err(searched_grid(w, bits)), err((s, z))
    assert bool((searched <= minmax + 1e-6).all()) and searched[0] < 0.9 * minmax[0]


def test_conv_patches_make_a_conv_a_linear_layer():
    from qvla.quant.layer_inputs import conv_patches

    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        y = conv(x)
        flat = conv_patches(conv, x) @ conv.weight.reshape(5, -1).t() + conv.bias
    assert torch.allclose(flat, y.permute(0, 2, 3, 1).reshape(-1, 5), atol=1e-5)
    with pytest.raises(ValueError, match="groups=1"):
        conv_patches(nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5))


@pytest.mark.parametrize("bits", [4, 2])
def test_gptq_on_a_conv_is_no_worse_than_rtn(bits):
    """A conv GPTQ'd on its input patches: smaller output error than RTN's, and the checkpoint layer keeps
    GPTQ's weights."""
    from qvla.quant.apply import QuantConv2d
    from qvla.quant.layer_inputs import conv_patches
    from qvla.quant.methods.gptq import gptq_transform

    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1)
    x = torch.randn(16, 8, 10, 10, generator=g) * torch.linspace(0.2, 5, 8)[None, :, None, None]
    t = gptq_transform(conv_patches(conv, x), conv.weight.detach(), bits)
    assert t["weight"].shape == conv.weight.shape
    b = torch.full((12,), bits)
    gptq, rtn = QuantConv2d.from_conv(conv, b, 16, t), QuantConv2d.from_conv(conv, b, 16)
    assert torch.allclose(gptq.weight, t["weight"], atol=1e-6)
    with torch.no_grad():
        ref = conv(x)
        assert float((gptq(x) - ref).pow(2).sum()) < float((rtn(x) - ref).pow(2).sum())


def test_gptq_plans_cover_convs(make_toy, toy_obs):
    """The GPTQ baseline and QVLA + GPTQ put GPTQ's weights on the conv as well as on the Linear layers."""
    from qvla.quant.methods.qvla_gptq import gptq_at_planned_bits

    policy = make_toy()
    plan = METHODS["gptq"](policy, QuantConfig(method="gptq", w_bits=4), toy_obs, {})
    assert {"0", "3", "5"} <= {n for n, t in plan.transforms.items() if "weight" in t}
    assert plan.transforms["0"]["weight"].shape == policy.model[0].weight.shape
    mixed = METHODS["rtn"](policy, QuantConfig(method="rtn", w_bits=2), None, {})
    mixed.bits["0"] = torch.tensor([16, 2, 4, 0], dtype=torch.int8)
    mixed = gptq_at_planned_bits(policy, mixed, toy_obs)
    w = mixed.transforms["0"]["weight"]
    assert torch.equal(w[0], policy.model[0].weight[0].detach()) and not w[3].any()
    quantize_(policy, mixed)  # the mixed-bit conv applies


def test_omniquant_block_trains_each_block_on_its_quantized_inputs(monkeypatch, random_observation):
    """Block-wise OmniQuant on a random micro-VLA at W4A4: every block's output error falls with training,
    every Linear layer gets its transform (convs none: RTN), and the plan reproduces the trained blocks."""
    import qvla.quant.methods.omniquant_block as OB
    from qvla.policies import build_policy
    from qvla.policies.microvla.model import init_weights

    policy = build_policy("microvla-chunk")
    init_weights(policy.model, 0)
    obs = [random_observation(i) for i in range(6)]
    monkeypatch.setattr(OB, "EPOCHS", 3)
    plan = METHODS["omniquant-block"](policy, QuantConfig(method="omniquant-block", w_bits=4, a_bits=4), obs)
    mods = dict(policy.model.named_modules())
    linears = {n for n in plan.bits if isinstance(mods[n], nn.Linear)}
    assert set(plan.transforms) == linears
    losses = plan.provenance["block_loss"]
    assert list(losses) == policy.quant_blocks()
    assert all(v["end"] < v["start"] for v in losses.values()), losses
    quant = __import__("copy").deepcopy(policy)
    quantize_(quant, plan)
    batches = OB._batches(policy, obs)
    for b in ("vision.blocks.0", "llm.layers.3", "action_head"):  # the quantized policy's block errors are the trained ones
        fp, q = OB.block_calls(policy, b, batches), OB.block_calls(quant, b, batches)
        err = sum(float((x[2] - y[2]).pow(2).mean()) for x, y in zip(q, fp)) / len(fp)
        assert err == pytest.approx(losses[b]["end"], rel=1e-3), b


def test_qvla_sq_gptq_measures_and_rounds_the_smoothed_layers(make_toy, toy_obs):
    """qvla-sq-gptq: SmoothQuant's scales at the configured alpha on every Linear, the sensitivities it
    allocates from measured under them, and GPTQ's codes for every row it rounds."""
    from qvla.quant import sensitivity as S
    from qvla.quant.methods import TRANSFORMED, transforms_for
    from qvla.quant.methods.smoothquant import smoothing_transforms

    toy = make_toy()
    cfg = QuantConfig(method="qvla-sq-gptq", w_bits=4, a_bits=8, alpha=0.7)
    transforms = transforms_for("qvla-sq-gptq")(toy, cfg, toy_obs)
    sens = S.compute(toy, toy_obs, a_bits=8, batch_size=8, transforms=(TRANSFORMED["qvla-sq-gptq"], transforms))
    plan = METHODS["qvla-sq-gptq"](toy, cfg, (sens, transforms, toy_obs), {})
    smooth = smoothing_transforms(toy, toy_obs, list(plan.bits), 0.7)
    assert smooth and plan.provenance["alpha"] == 0.7
    for n, t in smooth.items():
        assert torch.equal(plan.transforms[n]["in_scale"], t["in_scale"])
        assert "weight" in plan.transforms[n] or not bool(((plan.bits[n] > 0) & (plan.bits[n] < 16)).any())
    assert not torch.equal(next(iter(smooth.values()))["in_scale"],
                           next(iter(smoothing_transforms(toy, toy_obs, list(plan.bits), 0.5).values()))["in_scale"])
