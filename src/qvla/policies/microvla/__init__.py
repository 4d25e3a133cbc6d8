"""micro-VLA: a 2.5 M-parameter VLA shaped like OpenVLA (token head) or OpenVLA-OFT (chunk head)."""
from __future__ import annotations

import numpy as np
import torch

from qvla.checkpoint import load_state_strict
from qvla.envs.base import Observation
from qvla.policies.base import roles_by_prefix
from qvla.policies.microvla.config import VARIANTS, MicroVLAConfig
from qvla.policies.microvla.model import MicroVLA
from qvla.policies.microvla.tokenizer import WordTokenizer

ROLE_TABLE = [
    ("vision.", "vision"),
    ("projector.", "projector"),
    ("proprio_proj", "projector"),
    ("llm.embed_tokens", "embedding"),
    ("llm.", "llm"),
    ("action_head.", "action_head"),
    ("lm_head", "lm_head"),
]


class MicroVLAPolicy:
    family = "microvla"

    def __init__(self, config: MicroVLAConfig, name: str = "microvla") -> None:
        self.config, self.name = config, name
        self.tokenizer = WordTokenizer.load()
        if len(self.tokenizer) != config.text_vocab:
            raise ValueError(f"config.text_vocab={config.text_vocab} but the shipped vocabulary has "
                             f"{len(self.tokenizer)} tokens")
        self.model = MicroVLA(config).eval()

    def load_tensors(self, tensors: dict[str, torch.Tensor], where: str) -> None:
        load_state_strict(self.model, tensors, where)

    def reset(self) -> None:  # stateless between calls: each chunk is predicted from the current frame
        pass

    def batch(self, observations: list[Observation]) -> dict[str, torch.Tensor]:
        """Observations -> model inputs (images uint8, text ids, proprio)."""
        c = self.config
        images = np.stack([np.stack([o.images[cam] for cam in c.cameras]) for o in observations])
        return {
            "images": torch.from_numpy(images).permute(0, 1, 4, 2, 3).contiguous(),
            "text": torch.tensor([self.tokenizer.encode(o.instruction, c.text_len) for o in observations]),
            "proprio": torch.from_numpy(np.stack([o.proprio for o in observations])).float(),
        }

    @torch.no_grad()
    def act(self, obs: Observation) -> np.ndarray:
        b = self.batch([obs])
        return self.model.predict(b["images"], b["text"], b["proprio"])[0].float().numpy()

    def action_outputs(self, batch: dict[str, torch.Tensor], form: str) -> torch.Tensor:
        """Differentiable outputs for sensitivity analysis.

        form "action": (B, K*A) continuous actions (the chunk; for the token head, the expected action
        under the bin distribution). form "logits": (B, K*A, bins) action-bin logits (token head only).
        The token head is teacher-forced on its own greedy full-precision tokens, found first without grad.
        """
        m, c = self.model, self.config
        if c.head == "chunk":
            if form != "action":
                raise ValueError(f"the chunk head has continuous outputs only; form must be 'action', got {form!r}")
            return m.forward_chunk(batch["images"], batch["text"], batch["proprio"]).flatten(1)
        if "action_ids" not in batch:
            raise ValueError("token head: batch needs 'action_ids' (see teacher_ids())")
        logits = m.forward_token_logits(batch["images"], batch["text"], batch["proprio"], batch["action_ids"])
        if form == "logits":
            return logits
        if form == "action":
            centers = (torch.arange(c.action_bins, dtype=logits.dtype) + 0.5) / c.action_bins * 2 - 1
            return (logits.softmax(-1) * centers).sum(-1)
        raise ValueError(f"form must be 'action' or 'logits', got {form!r}")

    @torch.no_grad()
    def teacher_ids(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adds the greedy full-precision action tokens to a batch (no-op for the chunk head)."""
        if self.config.head == "token":
            actions = self.model.generate_actions(batch["images"], batch["text"], batch["proprio"])
            batch = {**batch, "action_ids": self.model.action_token_ids(actions.flatten(1))}
        return batch

    def output_forms(self) -> tuple[str, ...]:
        return ("action",) if self.config.head == "chunk" else ("logits", "action")

    def module_roles(self) -> dict[str, str]:
        return roles_by_prefix(self.model, ROLE_TABLE)

    def fold_pairs(self) -> list[tuple[str, str]]:
        # fc1 -> GELU -> fc2 in each ViT block and in the projector; gate / up -> SwiGLU -> down in each LLM
        # layer, which folds only where gate and up emit the same order (their bits tied: tied_channels());
        # the action head reuses fc1's output twice
        blocks = [f"vision.blocks.{i}" for i in range(len(self.model.vision.blocks))]
        pairs = [(f"{b}.fc1", f"{b}.fc2") for b in [*blocks, "projector"]]
        for mlp in self._swiglu():
            pairs += [(f"{mlp}.gate_proj", f"{mlp}.down_proj"), (f"{mlp}.up_proj", f"{mlp}.down_proj")]
        return pairs

    def quant_blocks(self) -> list[str]:
        """The units a block-wise method (omniquant-block) trains one after the other, in forward order."""
        m = self.model
        head = ["action_head"] if self.config.head == "chunk" else []
        return ([f"vision.blocks.{i}" for i in range(len(m.vision.blocks))] + ["projector"]
                + [f"llm.layers.{i}" for i in range(len(m.llm.layers))] + head)

    def tied_channels(self) -> list[list[str]]:
        """Layers whose channel c is multiplied elementwise (SwiGLU's gate and up): `qvla quantize --tie` gives
        them the same bits per channel, so both emit one bucket order that the down projection absorbs."""
        return [[f"{mlp}.gate_proj", f"{mlp}.up_proj"] for mlp in self._swiglu()]

    def _swiglu(self) -> list[str]:
        return [f"llm.layers.{i}.mlp" for i in range(len(self.model.llm.layers))]


__all__ = ["VARIANTS", "MicroVLAConfig", "MicroVLAPolicy", "MicroVLA"]
