"""bench/gpu_scale.py's kernels, on this CPU: every form of a 7B-shaped layer kind gives its dequantized weights'
output (bf16 inputs; A8 rounding for W8A8), a folded pair included, and holds the bytes its format says."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
import gpu_scale  # noqa: E402


@pytest.mark.parametrize("form", ["w8a8", "w4a16", "qvla-4-held"])
def test_projector_forms_match_dequantized_weights(form):
    plans = {gpu_scale.FORMS[form][0]: gpu_scale.random_plan(*gpu_scale.FORMS[form][0])} \
        if isinstance(gpu_scale.FORMS[form][0], tuple) else {}
    block, nbytes, err = gpu_scale.build("projector", form, plans, torch.device("cpu"))
    layers = {"fc1", "fc2", "fc3"}
    assert set(err) == layers | {f"{n}@1" for n in layers} | {"fc1->fc2", "fc2->fc3"}  # 64 tokens, 1, folded pairs
    assert not gpu_scale.off(err), err
    assert max(err.values()) < gpu_scale.TOLERANCE, err  # at A16 and A8 a pair stays within a layer's tolerance here
    params = sum(n * k for n, k in gpu_scale.SHAPES["projector"].values())
    bits = {"w8a8": 8, "w4a16": 4, "qvla-4-held": 4}[form]
    assert params * bits / 8 <= nbytes < params * bits / 8 * 1.1 + 1e6  # packed codes + scales, nothing else
    y = block(torch.randn(1, 8, 2176, dtype=torch.bfloat16))
    assert y.shape == (1, 8, 4096) and torch.isfinite(y.float()).all()


def test_w8a8_rows_padded_as_cublaslt_wants_give_the_same_output():
    """On CUDA torch._int_mm wants more than 16 rows: a decode step's single token is padded to 17; rows (N) and
    inputs (K) to multiples of 8. The padding must not change the product."""
    g = torch.Generator().manual_seed(0)
    n, k = 13, 100  # neither a multiple of 8
    codes, scale = torch.randint(-127, 128, (n, k), generator=g), torch.rand(n, generator=g) * 0.01
    rows = gpu_scale.Int8A8Rows(codes, scale, torch.device("cpu"))
    x = torch.randn(3, k, generator=g).to(torch.bfloat16)
    plain = rows(x)
    rows.min_rows = 17
    assert torch.equal(rows(x), plain)
    step = x.float().abs().amax(-1, keepdim=True) / 127
    ref = (torch.round(x.float() / step) * step) @ (codes.float() * scale[:, None]).t()
    assert torch.allclose(plain.float(), ref, rtol=1e-2, atol=1e-3)
