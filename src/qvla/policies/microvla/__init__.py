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

    def module_roles(self) -> dict[str, str]:
        return roles_by_prefix(self.model, ROLE_TABLE)


__all__ = ["VARIANTS", "MicroVLAConfig", "MicroVLAPolicy", "MicroVLA"]
