"""Every registered policy: acts on a real observation, tags every layer with a role, decodes consistently."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from qvla.envs import Observation
from qvla.policies import POLICIES, ROLES, build_policy
from qvla.policies.microvla.model import init_weights


@pytest.fixture(scope="module", params=sorted(POLICIES))
def policy(request):
    p = build_policy(request.param)
    init_weights(p.model, 0)
    return p


@pytest.fixture(scope="module")
def token_model():
    p = build_policy("microvla-token")
    init_weights(p.model, 1)
    return p.model


def test_act_returns_a_finite_chunk(policy, reach_obs):
    a = policy.act(reach_obs)
    assert isinstance(a, np.ndarray)
    assert a.shape == (policy.config.chunk, 4)
    assert np.all(np.isfinite(a))
    if policy.config.head == "token":
        assert np.all(np.abs(a) <= 1.0)


def test_batched_prediction_matches_single(policy, reach_obs):
    """Batch rows must not see each other, even when their instructions pad to different lengths."""
    other = Observation({k: v[::-1].copy() for k, v in reach_obs.images.items()}, reach_obs.proprio + 0.05,
                        "insert the peg into the hole from the side", "peg-insert-side")
    b = policy.batch([reach_obs, other])
    assert (b["text"][0] == 0).sum() != (b["text"][1] == 0).sum()  # the two really pad differently
    with torch.no_grad():
        batched = policy.model.predict(b["images"], b["text"], b["proprio"]).numpy()
    for i, obs in enumerate([reach_obs, other]):
        np.testing.assert_allclose(batched[i], policy.act(obs), atol=1e-4)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_instruction_padding_is_invisible(name, reach_obs):
    p = build_policy(name)
    if not p.config.use_proprio:
        pytest.skip("without proprio the prefix ends in <pad> for short instructions, and the token head reads "
                    "its first action from that last position, so the <pad> embedding acts as its query")
    init_weights(p.model, 2)
    before = p.act(reach_obs)
    with torch.no_grad():
        p.model.llm.embed_tokens.weight[0] += 1.0  # the <pad> embedding: masked keys must not matter
    np.testing.assert_allclose(p.act(reach_obs), before, atol=1e-5)
    with torch.no_grad():
        p.model.llm.embed_tokens.weight[1] += 1.0  # <bos> is a real token: the same edit must show
    assert not np.allclose(p.act(reach_obs), before, atol=1e-5)


def test_module_roles_cover_every_layer(policy):
    roles = policy.module_roles()
    layers = {n for n, m in policy.model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert layers <= set(roles)
    assert set(roles.values()) <= set(ROLES)
    assert {"vision", "projector", "llm"} <= set(roles.values())
    head = "action_head" if policy.config.head == "chunk" else "lm_head"
    assert head in roles.values()
    assert roles["vision.stem.0"] == "vision" and roles["llm.layers.0.self_attn.q_proj"] == "llm"


def test_action_tokens_round_trip_within_half_a_bin(token_model):
    c = token_model.config
    a = torch.cat([torch.rand(4096) * 2 - 1, torch.tensor([-1.0, 1.0, 0.0, -0.99999, 0.99999])])
    ids = token_model.action_token_ids(a)
    assert ids.min() >= c.text_vocab and ids.max() < c.text_vocab + c.action_bins
    back = token_model.token_ids_to_actions(ids)
    assert (back - a).abs().max() <= 1.0 / c.action_bins + 1e-6  # bin centres: half of the 2/256 width
    assert ids.unique().numel() == c.action_bins  # 4096 uniform draws hit every bin


def greedy_without_cache(model, images, text, proprio) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference decoder: recomputes the whole sequence for each token through the teacher-forcing path."""
    c = model.config
    B = images.shape[0]
    ids = torch.empty(B, 0, dtype=torch.long)
    logits_all = []
    for _ in range(c.chunk * c.action_dim):
        placeholder = torch.full((B, 1), c.text_vocab, dtype=torch.long)  # dropped: only inputs [:-1] are read
        logits = model.forward_token_logits(images, text, proprio, torch.cat([ids, placeholder], 1))[:, -1]
        logits_all.append(logits)
        ids = torch.cat([ids, (logits.argmax(-1) + c.text_vocab)[:, None]], 1)
    actions = model.token_ids_to_actions(ids).view(B, c.chunk, c.action_dim)
    return actions, torch.stack(logits_all, 1)


def test_kv_cache_decoding_equals_full_recompute(token_model, reach_obs):
    p = build_policy("microvla-token")
    other = Observation(reach_obs.images, reach_obs.proprio, "push the drawer closed", "drawer-close")
    b = p.batch([reach_obs, other])
    with torch.no_grad():
        ref_actions, ref_logits = greedy_without_cache(token_model, b["images"], b["text"], b["proprio"])
    actions, logits = token_model.generate_actions(b["images"], b["text"], b["proprio"], return_logits=True)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(actions, ref_actions, atol=0, rtol=0)
    assert len(actions[0].unique()) > 1  # a non-degenerate decode: not one token repeated


def test_unknown_policy_lists_registered():
    with pytest.raises(KeyError, match="microvla-chunk"):
        build_policy("openvla-7b")
