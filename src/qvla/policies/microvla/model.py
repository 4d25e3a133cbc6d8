"""The micro-VLA network: conv-stem ViT -> MLP projector -> Llama-style decoder -> action head.

Module names follow OpenVLA / Llama (q_proj ... down_proj, lm_head) so that anything that quantizes this
model by name or role carries over. Two heads:
  - token (OpenVLA): action dims are tokens 256 bins wide, the last ids of the vocabulary, decoded
    autoregressively through lm_head with a KV cache; prefix and actions are causal.
  - chunk (OpenVLA-OFT): K learned action-query tokens read the whole prefix and each other (parallel
    decoding); an MLP regresses the K x A chunk from their hidden states.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from qvla.policies.microvla.config import MicroVLAConfig

IMAGE_MEAN, IMAGE_STD = 0.5, 0.25
PROPRIO_CENTER = (0.0, 0.65, 0.15, 0.5)  # metres (hand xyz) and gripper opening (0..1)
PROPRIO_SCALE = (0.3, 0.25, 0.15, 0.5)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding on (B, H, S, D) with positions (S,), Llama's rotate-half convention."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
    ang = pos.float()[:, None] * freqs[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, dim: int, heads: int, theta: float) -> None:
        super().__init__()
        self.heads, self.theta = heads, theta
        self.q_proj, self.k_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.v_proj, self.o_proj = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)

    def forward(self, x, pos, mask, cache=None):
        B, S, D = x.shape
        q, k, v = (p(x).view(B, S, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rope(q, pos, self.theta), rope(k, pos, self.theta)
        if cache is not None:
            k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, D)), (k, v)


class LlamaMLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, c: MicroVLAConfig) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(c.llm_dim), RMSNorm(c.llm_dim)
        self.self_attn = LlamaAttention(c.llm_dim, c.llm_heads, c.rope_theta)
        self.mlp = LlamaMLP(c.llm_dim, c.llm_mlp)

    def forward(self, x, pos, mask, cache=None):
        h, kv = self.self_attn(self.input_layernorm(x), pos, mask, cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class LlamaDecoder(nn.Module):
    def __init__(self, c: MicroVLAConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.llm_dim)
        self.layers = nn.ModuleList(LlamaLayer(c) for _ in range(c.llm_layers))
        self.norm = RMSNorm(c.llm_dim)

    def forward(self, x, pos, mask, cache=None):
        new_cache = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, pos, mask, None if cache is None else cache[i])
            new_cache.append(kv)
        return self.norm(x), new_cache


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, S, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, D))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class VisionEncoder(nn.Module):
    """A ViT with an early-convolution stem (4 stride-2 convs = one 16-px patch per token): a plain
    16-px patchify learns far more slowly from a few thousand demonstrations."""

    def __init__(self, c: MicroVLAConfig) -> None:
        super().__init__()
        chans = (3, 32, 64, 128, c.vision_dim)
        self.stem = nn.ModuleList(nn.Conv2d(a, b, 3, 2, 1) for a, b in zip(chans[:-1], chans[1:]))
        self.stem_norms = nn.ModuleList(nn.GroupNorm(8, b) for b in chans[1:-1])
        self.pos_embed = nn.Parameter(torch.randn(1, c.patches, c.vision_dim) * 0.02)
        self.blocks = nn.ModuleList(ViTBlock(c.vision_dim, c.vision_heads) for _ in range(c.vision_layers))
        self.norm = nn.LayerNorm(c.vision_dim)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = img
        for i, conv in enumerate(self.stem):
            x = conv(x)
            x = F.gelu(self.stem_norms[i](x)) if i < len(self.stem_norms) else x
        x = x.flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class Projector(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_in, d_out), nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class ActionHead(nn.Module):
    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2, self.fc3 = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.fc1(self.norm(x)))
        return self.fc3(x + F.gelu(self.fc2(x)))


class MicroVLA(nn.Module):
    def __init__(self, c: MicroVLAConfig) -> None:
        super().__init__()
        self.config = c
        self.vision = VisionEncoder(c)
        self.camera_embed = nn.Parameter(torch.zeros(len(c.cameras), 1, c.vision_dim))
        self.projector = Projector(c.vision_dim, c.llm_dim)
        self.proprio_proj = nn.Linear(4, c.llm_dim) if c.use_proprio else None
        self.llm = LlamaDecoder(c)
        if c.head == "chunk":
            self.action_queries = nn.Parameter(torch.randn(c.chunk, c.llm_dim) * 0.02)
            self.action_head = ActionHead(c.llm_dim, c.action_dim)
        else:
            self.lm_head = nn.Linear(c.llm_dim, c.vocab_size, bias=False)
        self.register_buffer("_pmean", torch.tensor(PROPRIO_CENTER), persistent=False)
        self.register_buffer("_pscale", torch.tensor(PROPRIO_SCALE), persistent=False)

    # -- prefix: images, instruction, proprio ------------------------------------------------------
    def prefix(self, images: torch.Tensor, text: torch.Tensor, proprio: torch.Tensor | None):
        """images (B, C, 3, H, W) uint8, text (B, L) ids, proprio (B, 4) -> embeddings, key-valid mask."""
        B, C = images.shape[:2]
        x = (images.flatten(0, 1).float() / 255.0 - IMAGE_MEAN) / IMAGE_STD
        v = self.vision(x).view(B, C, -1, self.config.vision_dim) + self.camera_embed[None]
        parts = [self.projector(v.flatten(1, 2)), self.llm.embed_tokens(text)]
        valid = [torch.ones(B, parts[0].shape[1], dtype=torch.bool, device=text.device), text != 0]
        if self.proprio_proj is not None:
            parts.append(self.proprio_proj((proprio - self._pmean) / self._pscale)[:, None])
            valid.append(valid[0][:, :1])
        return torch.cat(parts, 1), torch.cat(valid, 1)

    @staticmethod
    def attention_mask(valid: torch.Tensor, bidirectional_tail: int = 0) -> torch.Tensor:
        """(B, 1, S, S) bool: causal, padded keys hidden, the last `bidirectional_tail` queries see each other."""
        S = valid.shape[1]
        allowed = torch.ones(S, S, dtype=torch.bool, device=valid.device).tril()
        if bidirectional_tail:
            allowed[S - bidirectional_tail:, S - bidirectional_tail:] = True
        return (allowed[None] & valid[:, None, :])[:, None]

    # -- chunk head --------------------------------------------------------------------------------
    def forward_chunk(self, images, text, proprio=None) -> torch.Tensor:
        """-> (B, K, A) continuous actions."""
        c = self.config
        h, valid = self.prefix(images, text, proprio)
        B = h.shape[0]
        h = torch.cat([h, self.action_queries[None].expand(B, -1, -1)], 1)
        valid = torch.cat([valid, valid[:, :1].expand(-1, c.chunk)], 1)
        pos = torch.arange(h.shape[1], device=h.device)
        out, _ = self.llm(h, pos, self.attention_mask(valid, c.chunk))
        return self.action_head(out[:, -c.chunk:])

    # -- token head --------------------------------------------------------------------------------
    def action_token_ids(self, actions: torch.Tensor) -> torch.Tensor:
        c = self.config
        bins = ((actions.clamp(-1, 1) + 1) / 2 * c.action_bins).long().clamp(max=c.action_bins - 1)
        return c.text_vocab + bins

    def token_ids_to_actions(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.config
        return ((ids - c.text_vocab).float() + 0.5) / c.action_bins * 2 - 1

    def forward_token_logits(self, images, text, proprio, action_ids) -> torch.Tensor:
        """Teacher forcing: -> (B, K*A, action_bins) logits over the action bins, one per action token.

        OpenVLA scores the full vocabulary; non-action ids can never be a valid action, so both training
        and decoding here restrict the softmax to the action bins (the LM head keeps its full size).
        """
        h, valid = self.prefix(images, text, proprio)
        n = action_ids.shape[1]
        h = torch.cat([h, self.llm.embed_tokens(action_ids[:, :-1])], 1)
        valid = torch.cat([valid, valid[:, :1].expand(-1, n - 1)], 1)
        pos = torch.arange(h.shape[1], device=h.device)
        out, _ = self.llm(h, pos, self.attention_mask(valid))
        return self.lm_head(out[:, -n:])[..., self.config.text_vocab:]

    @torch.no_grad()
    def generate_actions(self, images, text, proprio=None, return_logits: bool = False):
        """Greedy autoregressive decoding of K*A action tokens with a KV cache -> (B, K, A)."""
        c = self.config
        h, valid = self.prefix(images, text, proprio)
        pos = torch.arange(h.shape[1], device=h.device)
        out, cache = self.llm(h, pos, self.attention_mask(valid))
        ids, all_logits = [], []
        for _ in range(c.chunk * c.action_dim):
            logits = self.lm_head(out[:, -1])[:, c.text_vocab:]
            all_logits.append(logits)
            nxt = logits.argmax(-1) + c.text_vocab
            ids.append(nxt)
            valid = torch.cat([valid, valid[:, :1]], 1)
            pos = pos[-1:] + 1
            out, cache = self.llm(self.llm.embed_tokens(nxt)[:, None], pos, valid[:, None, None, :], cache)
        actions = self.token_ids_to_actions(torch.stack(ids, 1)).view(-1, c.chunk, c.action_dim)
        return (actions, torch.stack(all_logits, 1)) if return_logits else actions

    def predict(self, images, text, proprio=None) -> torch.Tensor:
        if self.config.head == "chunk":
            return self.forward_chunk(images, text, proprio)
        return self.generate_actions(images, text, proprio)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_weights(model: MicroVLA, seed: int) -> None:
    """Deterministic init: the same seed gives the same weights on the same machine."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if p.ndim >= 2 and "embed" not in name and "queries" not in name:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("bias"):
                p.zero_()
            elif "embed" in name or "queries" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
