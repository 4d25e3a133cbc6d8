"""Packed storage and the real-kernel layers: lossless packing, exact storage round trip, kernel outputs
against the fake-quant reference, refusals of malformed storage, and loading without pickle."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from qvla.quant.apply import QuantConv2d, QuantLinear, weight_nbytes
from qvla.quant import lowbit
from qvla.quant.kernels import HalfKernel, Int4Kernel, Int8Kernel
from qvla.quant.packed import PackedConv2d, PackedLinear, conv_params, packed_layer
from qvla.quant.packing import pack, packed_width, unpack
from qvla.quant.primitives import fake_quant_mixed
from qvla.quant.storage import dequantize_storage, from_storage, storage_nbytes, validate_storage


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), rows=st.integers(0, 5), k=st.integers(1, 70), seed=st.integers(0, 99))
def test_pack_unpack_round_trip(bits, rows, k, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-128, 128) if bits == 8 else (0, 2**bits)
    codes = torch.randint(lo, hi, (rows, k), generator=g)
    packed = pack(codes, bits)
    assert packed.shape == (rows, packed_width(k, bits))
    assert torch.equal(unpack(packed, bits, k).long(), codes)


@pytest.mark.parametrize("bits, bad", [(4, 16), (2, 4), (4, -1), (8, 128)])
def test_pack_refuses_codes_out_of_range(bits, bad):
    with pytest.raises(ValueError, match="codes must lie in"):
        pack(torch.tensor([[0, bad]]), bits)


def test_unpack_refuses_a_width_that_cannot_hold_k():
    with pytest.raises(ValueError, match="cannot hold 9 codes"):
        unpack(torch.zeros(2, 2, dtype=torch.uint8), 4, 9)


def mixed_layer(n: int, k: int, seed: int = 0, conv: bool = False):
    g = torch.Generator().manual_seed(seed)
    mod = nn.Conv2d(k // 9, n, 3) if conv else nn.Linear(k, n)
    with torch.no_grad():
        mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.1)
    bits = torch.tensor([16, 8, 4, 2, 0])[torch.randint(0, 5, (n,), generator=g)]
    return mod, bits


@pytest.mark.parametrize("n, k, conv", [(1, 5, False), (17, 33, False), (40, 128, False), (13, 27, True)])
def test_storage_round_trip_is_exact(n, k, conv):
    mod, bits = mixed_layer(n, k, conv=conv)
    sim = (QuantConv2d.from_conv if conv else QuantLinear.from_linear)(mod, bits, 16)
    storage = sim.storage()
    validate_storage(storage, tuple(mod.weight.shape), "test")
    w = dequantize_storage(storage, mod.weight.shape)
    ref = fake_quant_mixed(mod.weight.detach(), bits)
    fp = bits == 16  # kept rows are stored in fp16
    assert torch.equal(w[~fp], ref[~fp])
    assert torch.allclose(w[fp], ref[fp], rtol=1e-3, atol=1e-6)
    rebuilt = type(sim)(from_storage(storage, mod.weight.shape), mod.weight.shape, mod.bias, 16,
                        *([sim.conv] if conv else []))  # the simulated loader's layer
    assert torch.equal(rebuilt.weight, w)


def test_storage_bytes_follow_the_bits():
    mod = nn.Linear(256, 64)
    for b, per_weight in [(8, 1.0), (4, 0.5), (2, 0.25)]:
        sim = QuantLinear.from_linear(mod, torch.full((64,), b), 16)
        nbytes = storage_nbytes(sim.storage())
        assert 64 * 256 * per_weight <= nbytes <= 64 * 256 * per_weight + 64 * 6  # + scale, zero, bits


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum().clamp_min(1e-30)))


@pytest.mark.parametrize("n, k", [(40, 128), (17, 33), (64, 384), (5, 64)])
@pytest.mark.parametrize("a_bits", [16, 8, 4])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_real_kernels_match_the_fake_quant_layer(n, k, a_bits, tokens):
    mod, bits = mixed_layer(n, k, seed=n + k)
    sim = QuantLinear.from_linear(mod, bits, a_bits)
    real = PackedLinear(sim.storage(), mod.weight.shape, mod.bias, a_bits)
    x = torch.randn(2, tokens, k)
    with torch.no_grad():
        ref, out = sim(x), real(x)
    assert out.shape == ref.shape
    min_db = {16: 35.0, 8: 30.0, 4: 20.0}[a_bits]  # kernels re-round activations (int8 per token, bf16)
    assert sqnr_db(ref, out) > min_db
    pruned = bits == 0
    assert torch.allclose(out[..., pruned], mod.bias[pruned].expand_as(out[..., pruned]))


@pytest.mark.skipif(not lowbit.available(), reason="no AVX2/FMA on this CPU")
@pytest.mark.parametrize("a_bits", [8, 4])
def test_integer_only_layer_leaves_the_rounding_to_its_kernels(a_bits):
    """A layer of 8/4/2-bit and pruned rows at A8/A4 hands its activations to qvla's kernel unrounded (the
    kernel rounds each token on the plan's grid): its output is still the simulated layer's up to float
    sums. With 16-bit rows, or with activation clipping, the layer rounds first."""
    g = torch.Generator().manual_seed(a_bits)
    mod = nn.Linear(96, 40)
    bits = torch.tensor([8, 4, 2, 0])[torch.randint(0, 4, (40,), generator=g)]
    sim = QuantLinear.from_linear(mod, bits, a_bits)
    real = PackedLinear(sim.storage(), mod.weight.shape, mod.bias, a_bits)
    assert real.kernels_round
    x = torch.randn(5, 96, generator=g) * torch.rand(1, 96, generator=g) * 3
    with torch.no_grad():
        ref, out = sim(x), real(x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5
    with_fp = PackedLinear(QuantLinear.from_linear(mod, torch.where(bits == 0, 16, bits), a_bits).storage(),
                           mod.weight.shape, mod.bias, a_bits)
    assert not with_fp.kernels_round


@pytest.mark.parametrize("n, k", [(16, 128), (5, 40)])
def test_int4_kernel_computes_the_dequantized_weight(n, k):
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scale, zero = torch.rand(n, generator=g) * 0.05 + 0.01, torch.randint(0, 16, (n,), generator=g)
    w = (codes.float() - zero[:, None]) * scale[:, None]
    x = torch.randn(3, k, generator=g).bfloat16().float()  # the kernel takes bf16 activations
    out = Int4Kernel(codes, scale, zero)(x)
    assert sqnr_db(x @ w.t(), out) > 40


def test_int8_kernel_is_close_to_the_float_product():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-127, 128, (24, 96), generator=g)
    scale = torch.rand(24, generator=g) * 0.01
    x = torch.randn(5, 96, generator=g)
    out = Int8Kernel(codes, scale)(x)
    assert sqnr_db(x @ (codes.float() * scale[:, None]).t(), out) > 30


def test_kernels_report_the_bytes_they_hold():
    assert HalfKernel(torch.zeros(3, 10)).nbytes == 60
    k8 = Int8Kernel(torch.zeros(3, 10, dtype=torch.int8), torch.ones(3))
    assert k8.nbytes == (3 * 12 if k8.gemm == "qvla" else 30) + 24  # codes (qvla's: K padded to 4) + two fp32 a row
    k4 = Int4Kernel(torch.zeros(16, 256, dtype=torch.uint8), torch.ones(16), torch.zeros(16))
    assert k4.nbytes == 16 * 128 + 16 * 2 * 2  # two codes per byte + one bf16 scale/zero pair per row


def test_packed_conv_matches_the_fake_quant_conv():
    mod, bits = mixed_layer(13, 27, conv=True)
    sim = QuantConv2d.from_conv(mod, bits, 8)
    real = PackedConv2d(sim.storage(), mod.weight.shape, mod.bias, 8, conv_params(mod))
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        assert sqnr_db(sim(x), real(x)) > 60  # same float math on fp16-stored rows
    assert real.weight_nbytes < mod.weight.numel() * 4


@pytest.mark.parametrize("breakage, message", [
    (lambda s: s.pop("w4"), "channels at 4 bits but no 'w4'"),
    (lambda s: s.update(w4=s["w4"][:, :-1]), "w4 has shape"),
    (lambda s: s.update(bits=s["bits"][:-1]), "bits has shape"),
    (lambda s: s.update(s4=s["s4"][:-1]), "s4 missing or not of shape"),
    (lambda s: s["bits"].__setitem__(0, 3), r"bit widths \[3\]"),
])
def test_malformed_storage_is_refused(breakage, message):
    mod = nn.Linear(20, 8)
    sim = QuantLinear.from_linear(mod, torch.tensor([4, 4, 8, 2, 16, 0, 4, 8]), 16)
    storage = sim.storage()
    breakage(storage)
    with pytest.raises(ValueError, match=message):
        validate_storage(storage, (8, 20), "layer x")


# ---- a real quantized checkpoint of the micro-VLA ----

@pytest.fixture(scope="module", params=[(8, 16), (4, 16), (8, 8)], ids=["w8a16", "w4a16", "w8a8"])
def rtn_ckpt(request, chunk_ckpt, tmp_path_factory):
    from qvla.quant.methods import QuantConfig
    from qvla.quant.pipeline import quantize

    w, a = request.param
    out = tmp_path_factory.mktemp("q") / f"rtn-w{w}a{a}"
    return quantize(str(chunk_ckpt), QuantConfig(method="rtn", w_bits=w, a_bits=a), None, out), request.param


def test_loading_runs_no_pickle(monkeypatch, rtn_ckpt):
    from qvla.policies import load_policy

    def refuse(*a, **k):
        raise AssertionError("pickle used while loading a checkpoint")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    policy = load_policy(rtn_ckpt[0])
    assert any(isinstance(m, PackedLinear) for m in policy.model.modules())
    assert {p.suffix for p in rtn_ckpt[0].iterdir()} <= {".json", ".safetensors"}


def test_real_kernel_policy_acts_like_the_simulated_one(rtn_ckpt, random_observation, chunk_ckpt):
    """A16: the kernels are exact up to bf16 / 14-bit activations. A8: the int8 kernel rounds
    activations to 7 bits per token where the simulation uses 8, so it may differ as much as the
    simulated policy differs from full precision, not more."""
    from qvla.policies import load_policy

    path, (w, a) = rtn_ckpt
    real, sim, fp = load_policy(path), load_policy(path, kernels="simulated"), load_policy(chunk_ckpt)
    assert weight_nbytes(real.model) < (0.35 if w == 8 else 0.2) * weight_nbytes(fp.model)
    obs = [random_observation(s) for s in range(4)]
    gap = max(np.abs(real.act(o) - sim.act(o)).max() for o in obs)
    quant_error = max(np.abs(fp.act(o) - sim.act(o)).max() for o in obs)
    assert gap < (0.02 if a == 16 else 2 * quant_error)


def test_packed_layer_dispatches_on_module_type():
    lin, bits = mixed_layer(8, 18)
    conv, cbits = mixed_layer(8, 18, conv=True)
    s_lin = QuantLinear.from_linear(lin, bits, 16).storage()
    s_conv = QuantConv2d.from_conv(conv, cbits, 16).storage()
    assert isinstance(packed_layer(lin, s_lin, lin.bias, 16), PackedLinear)
    assert isinstance(packed_layer(conv, s_conv, conv.bias, 16), PackedConv2d)


# ---- the output permutation folded into the next layer ----

@pytest.mark.parametrize("n, k", [(17, 33), (40, 128)])
def test_permuted_inputs_give_the_same_layer(n, k):
    """Storage fed its inputs in another order computes the same function of the permuted input."""
    from qvla.quant.storage import permute_inputs

    mod, bits = mixed_layer(n, k, seed=3)
    t = {"in_scale": torch.rand(k) + 0.5, "in_shift": torch.randn(k) * 0.1}
    storage = QuantLinear.from_linear(mod, bits, 8, t).storage()
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1))
    moved = permute_inputs(storage, perm)
    validate_storage(moved, (n, k), "test")
    assert torch.equal(dequantize_storage(moved, (n, k)), dequantize_storage(storage, (n, k))[:, perm])
    x = torch.randn(9, k)
    with torch.no_grad():
        ref = PackedLinear(storage, (n, k), mod.bias, 8)(x)
        out = PackedLinear(moved, (n, k), mod.bias, 8)(x[:, perm])
    assert torch.allclose(out, ref, atol=1e-5)


def test_folded_layer_emits_bucket_order_and_the_pair_is_unchanged():
    """fc1 -> GELU -> fc2: fc1 emitting its channels by bucket (no scatter) and fc2 taking its inputs in
    that order compute what the unfolded pair computes."""
    from qvla.quant.packed import bucket_order
    from qvla.quant.storage import permute_inputs

    fc1, bits1 = mixed_layer(48, 32, seed=5)
    fc2, bits2 = mixed_layer(32, 48, seed=6)
    s1 = QuantLinear.from_linear(fc1, bits1, 16).storage()
    s2 = QuantLinear.from_linear(fc2, bits2, 16).storage()
    order = bucket_order(bits1)
    assert sorted(order.tolist()) == list(range(48)) and (bits1[order][-int((bits1 == 0).sum()):] == 0).all()
    plain1, plain2 = PackedLinear(s1, (48, 32), fc1.bias, 16), PackedLinear(s2, (32, 48), fc2.bias, 16)
    fold1 = PackedLinear(s1, (48, 32), fc1.bias, 16, folded=True)
    fold2 = PackedLinear(permute_inputs(s2, order), (32, 48), fc2.bias, 16)
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert torch.allclose(fold1(x), plain1(x)[:, order], atol=1e-6)
        ref = plain2(torch.nn.functional.gelu(plain1(x)))
        out = fold2(torch.nn.functional.gelu(fold1(x)))
    assert torch.allclose(out, ref, atol=1e-4)


def test_mixed_policy_folds_its_pairs_and_acts_as_unfolded(chunk_ckpt, tmp_path, monkeypatch, random_observation):
    from qvla.policies import load_policy
    from qvla.policies.microvla import MicroVLAPolicy
    from qvla.quant.methods import METHODS, QuantConfig
    from qvla.quant.pipeline import quantize

    rtn = METHODS["rtn"]

    tied = {"llm.layers.0.mlp.gate_proj": "llm.layers.0.mlp.up_proj"}  # the other layers' gate and up stay untied

    def random_mixed(policy, cfg, data, provenance):  # every bit width in every layer
        plan = rtn(policy, cfg, data, provenance)
        g = torch.Generator().manual_seed(0)
        widths = torch.tensor([16, 8, 4, 2, 0], dtype=torch.int8)
        plan.bits = {n: widths[torch.randint(0, 5, b.shape, generator=g)] for n, b in plan.bits.items()}
        for a, b in tied.items():
            plan.bits[b] = plan.bits[a].clone()
        return plan

    monkeypatch.setitem(METHODS, "rtn", random_mixed)
    path = quantize(str(chunk_ckpt), QuantConfig(method="rtn", w_bits=8, a_bits=16), None, tmp_path / "q")
    folded = load_policy(path)
    pairs = folded.fold_pairs()
    untied = {p for g in folded.tied_channels() if g[0] not in tied for p in g}  # layers 1.. of the LLM
    assert untied <= {p for p, _ in pairs} and set(tied) <= {p for p, _ in pairs}
    # tied SwiGLU producers fold with everything else; untied ones (two different orders) do not
    wrong = [p for p, _ in pairs if folded.model.get_submodule(p).folded != (p not in untied)]
    assert not wrong, wrong
    monkeypatch.setattr(MicroVLAPolicy, "fold_pairs", lambda self: [])
    plain = load_policy(path)
    assert not any(plain.model.get_submodule(p).folded for p, _ in pairs)
    for s in range(3):  # the int4 kernel sums in another order and rounds to bf16: ulp-level differences
        o = random_observation(s)
        assert np.abs(folded.act(o) - plain.act(o)).max() < 0.02
