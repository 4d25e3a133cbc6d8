"""Action-space sensitivity on the toy policy, checked against brute force and against the true deviation."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr
from torch.autograd.functional import jacobian

from qvla.quant import sensitivity as S
from qvla.quant.primitives import fake_quant_rows

COL = {b: i for i, b in enumerate(S.SENS_BITS)}  # bits -> column of every table


@pytest.fixture
def sens(make_toy, toy_obs) -> S.Sensitivity:
    return S.compute(make_toy(), toy_obs, batch_size=8)


def test_tables_cover_every_quantizable_channel(sens):
    assert list(sens.product) == ["0", "3", "5"] and S.SENS_BITS == (16, 8, 4, 2, 0)
    assert {n: t.shape for n, t in sens.product.items()} == {"0": (4, 5), "3": (16, 5), "5": (6, 5)}
    assert sens.fan_in == {"0": 27, "3": 100, "5": 16}
    assert sens.roles == {"0": "vision", "3": "llm", "5": "action_head"}
    assert sens.meta["observations"] == 24 and sens.meta["form"] == "action"


@pytest.mark.parametrize("bins, form", [(0, "action"), (8, "logits")])
@pytest.mark.parametrize("a_bits", [16, 8])
def test_product_bounds_projected(make_toy, toy_obs, bins, form, a_bits):
    toy = make_toy(out=24 if bins else 6, bins=bins)
    sens = S.compute(toy, toy_obs, form=form, a_bits=a_bits, batch_size=8, probes=8)
    for n in sens.product:
        prod, proj = sens.product[n], sens.projected[n]
        assert (proj >= 0).all()
        # Cauchy-Schwarz per sample; equality where a layer has one token, so allow float rounding
        assert (proj <= prod * (1 + 1e-5) + 1e-12).all(), n
        if a_bits == 16:
            assert (prod[:, COL[16]] == 0).all() and (proj[:, COL[16]] == 0).all()
    conv = sens.product["0"][:, 1:], sens.projected["0"][:, 1:]  # 25 tokens per sample: strictly looser
    assert (conv[1] < conv[0]).all()


def test_sensitivity_grows_as_bits_drop(sens):
    for table in (sens.product, sens.projected):
        t = torch.cat(list(table.values()))
        monotone = (t.diff(dim=1) >= 0).all(1).double().mean()
        assert monotone >= 0.9
        assert (t[:, COL[0]] > t[:, COL[8]]).all() and (t[:, COL[2]] > t[:, COL[8]]).all()


def test_activation_bits_make_the_16_bit_column_positive(make_toy, toy_obs):
    a8 = S.compute(make_toy(), toy_obs, a_bits=8, batch_size=8)
    a4 = S.compute(make_toy(), toy_obs, a_bits=4, batch_size=8)
    for n in a8.product:
        assert (a8.product[n][:, COL[16]] > 0).all() and (a8.projected[n][:, COL[16]] > 0).all()
        assert a4.product[n][:, COL[16]].sum() > a8.product[n][:, COL[16]].sum()
    assert a8.meta["a_bits"] == 8


def test_jacobian_norm_matches_brute_force(make_toy, toy_obs, sens):
    model = make_toy().model
    for i, name in ((0, "0"), (3, "3"), (5, "5")):
        total = torch.zeros(model[i].weight.shape[0], dtype=torch.float64)
        for x in toy_obs:
            y = model[:i + 1](x[None])
            jac = jacobian(model[i + 1:], y)[0, :, 0]  # (outputs, C, *spatial)
            total += jac.movedim(1, 0).reshape(jac.shape[1], -1).norm(dim=1).double()
        assert torch.allclose(sens.jacobian[name], total, rtol=1e-4, atol=0), name
    assert torch.allclose(sens.jacobian["5"], torch.full((6,), 24.0, dtype=torch.float64))  # d out / d out = I


def test_projected_is_exact_for_the_output_layer(make_toy, toy_obs, sens):
    # the last layer's output is the action itself, so the first-order term is the whole deviation
    toy = make_toy()
    x = torch.stack(toy_obs)
    with torch.no_grad():
        ref = toy.model(x)
        w = toy.model[5].weight
        for c in range(w.shape[0]):
            for b in (8, 4, 2, 0):
                saved = w[c].clone()
                w[c] = fake_quant_rows(saved[None], b)[0]
                truth = (toy.model(x) - ref).norm(dim=-1).sum()
                w[c] = saved
                assert float(sens.projected["5"][c, COL[b]]) == pytest.approx(float(truth), rel=1e-4)


def test_batch_size_does_not_change_the_tables(make_toy, toy_obs, sens):
    other = S.compute(make_toy(), toy_obs, batch_size=5)  # uneven last batch
    for n in sens.product:
        for a, b in ((sens.product, other.product), (sens.projected, other.projected), (sens.jacobian, other.jacobian)):
            assert torch.allclose(a[n], b[n], rtol=1e-5, atol=1e-9), n


def test_validate_finds_the_proxy_predictive(make_toy, toy_obs, sens):
    v = S.validate(make_toy(), toy_obs, sens, 40, seed=0)
    assert v["k"] == 40 and len(v["triples"]) == 40
    assert v["spearman_product"] > 0.5 and v["spearman_projected"] > 0.5
    assert all(t["truth"] >= 0 for t in v["triples"])
    assert {t["layer"] for t in v["triples"]} <= {"0", "3", "5"}


def test_validate_refuses_activation_quantized_tables(make_toy, toy_obs):
    sens = S.compute(make_toy(), toy_obs[:4], a_bits=8)
    with pytest.raises(ValueError, match="a_bits=16"):
        S.validate(make_toy(), toy_obs[:4], sens, 4)


def test_validate_leaves_weights_unchanged(make_toy, toy_obs, sens):
    toy = make_toy()
    before = {k: v.clone() for k, v in toy.model.state_dict().items()}
    S.validate(toy, toy_obs[:8], sens, 10)
    assert all(torch.equal(before[k], v) for k, v in toy.model.state_dict().items())


def test_fisher_proxy_tracks_true_kl(make_toy, toy_obs):
    toy = make_toy(out=24, bins=8)  # (B, 3, 8) action-bin logits
    sens = S.compute(toy, toy_obs, form="logits", probes=64, batch_size=8)
    x = torch.stack(toy_obs)
    proxy, truth = [], []
    with torch.no_grad():
        ref = toy.action_outputs({"images": x}, "logits").log_softmax(-1)
        for name, mod in ((n, dict(toy.model.named_modules())[n]) for n in sens.projected):
            for c in range(mod.weight.shape[0]):
                saved = mod.weight[c].clone()
                mod.weight[c] = fake_quant_rows(saved[None], 2)[0]
                new = toy.action_outputs({"images": x}, "logits").log_softmax(-1)
                mod.weight[c] = saved
                truth.append(float((ref.exp() * (ref - new)).sum()))  # KL(p_fp || p_q)
                proxy.append(float(sens.projected[name][c, COL[2]]))
    assert len(truth) == 4 + 16 + 24
    assert pearsonr(proxy, truth).statistic > 0.8
    assert np.median(np.array(proxy) / np.array(truth)) == pytest.approx(1.0, abs=0.3)  # same scale, not just rank


def test_compute_refuses_a_form_the_policy_lacks(make_toy, toy_obs):
    with pytest.raises(ValueError, match=r"form 'logits' not available for toy; choose from \('action',\)"):
        S.compute(make_toy(), toy_obs, form="logits")


def test_save_load_round_trip(tmp_path, sens):
    S.save(tmp_path / "s.safetensors", sens, {"policy": "toy", "episodes": ["a", "b"]})
    back, meta = S.load(tmp_path / "s.safetensors")
    for table in ("product", "projected", "jacobian", "energy"):
        a, b = getattr(sens, table), getattr(back, table)
        assert list(b) == list(a) and all(torch.equal(a[n], b[n]) for n in a)
    assert back.fan_in == sens.fan_in and back.roles == sens.roles and back.meta == sens.meta
    assert meta["provenance"] == {"policy": "toy", "episodes": ["a", "b"]}


def test_load_refuses_a_foreign_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ValueError, match="not a qvla sensitivity file"):
        S.load(tmp_path / "x.safetensors")


def test_episode_weighting_makes_every_episode_weigh_the_same(make_toy, toy_obs):
    from qvla.quant.sensitivity import step_weights

    w = step_weights(["a", "b", "b", "b"], "episode")
    assert w.tolist() == pytest.approx([2.0, 2 / 3, 2 / 3, 2 / 3]) and float(w.sum()) == pytest.approx(4.0)
    assert step_weights(["a", "b"], "steps").tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="needs each calibration step's episode id"):
        step_weights(["a", None], "episode")
    # episode a = [x], episode b = [y, y, y]: weighted by episode, that is 2 * (S(x) + S(y))
    toy, x, y = make_toy(), toy_obs[0], toy_obs[1]
    weighted = S.compute(toy, [x, y, y, y], batch_size=3, weights=w)
    plain = S.compute(toy, [x, y], batch_size=2)
    for n in plain.projected:
        assert torch.allclose(weighted.projected[n], 2 * plain.projected[n], rtol=1e-4, atol=1e-9)
        assert torch.allclose(weighted.product[n], 2 * plain.product[n], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("bins,form", [(0, "action"), (3, "logits")])
def test_energy_is_the_square_of_the_projected_term_summed_over_steps(make_toy, toy_obs, bins, form):
    """energy = sum_n ||J dy||^2 (action) or, for the Fisher KL, which is quadratic already, the projected
    table itself. One step at a time it is exactly projected^2; summed over steps it is no larger than
    projected^2 (sum of squares <= square of the sum) and no smaller than projected^2 / steps (Cauchy-Schwarz)."""
    pol = make_toy(out=6, bins=bins)
    sens = S.compute(pol, toy_obs, form=form, batch_size=8, probes=4 if form == "logits" else None)
    for n in sens.projected:
        p, e = sens.projected[n], sens.energy[n]
        if form == "logits":
            assert torch.equal(e, p), n
            continue
        assert (e <= p.pow(2) * (1 + 1e-9)).all() and (e >= p.pow(2) / len(toy_obs) * (1 - 1e-9)).all(), n
    if form == "action":
        one = S.compute(pol, toy_obs[:1], form=form)
        for n in one.projected:
            assert torch.allclose(one.energy[n], one.projected[n].pow(2), rtol=1e-9, atol=1e-30), n


def test_a_cached_table_without_energy_is_measured_again(tmp_path, make_toy, toy_obs, monkeypatch):
    """Sensitivity files written before the energy table existed load with an empty one; asked for the energy
    proxy, sensitivity_for measures them again rather than allocating from nothing."""
    import dataclasses

    from qvla.quant import pipeline

    pol = make_toy()
    manifest = {"weights_sha256": "w", "episodes": [{"id": "e"}]}
    monkeypatch.setattr(pipeline, "step_weights", lambda obs, w: torch.ones(len(obs), dtype=torch.float64))
    old = dataclasses.replace(S.compute(pol, toy_obs, batch_size=8), energy={})
    sens, file = pipeline.sensitivity_for(pol, toy_obs, manifest, tmp_path, "action", 16, batch_size=8)
    S.save(file, old, {})  # the cache now holds a file without energy
    assert not S.load(file)[0].energy
    reused, _ = pipeline.sensitivity_for(pol, toy_obs, manifest, tmp_path, "action", 16, batch_size=8)
    assert not reused.energy  # the projected proxy reuses it as it is
    again, _ = pipeline.sensitivity_for(pol, toy_obs, manifest, tmp_path, "action", 16, batch_size=8, table="energy")
    assert again.energy and S.load(file)[0].energy  # measured again and the cache replaced
