"""Configuration of the micro-VLA policies: one flat dataclass, two registered variants."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

HEADS = ("chunk", "token")
CAMERAS = ("third", "wrist")


@dataclass
class MicroVLAConfig:
    head: str = "chunk"  # "chunk": OFT-style parallel decoding, L1 MLP head; "token": OpenVLA-style 256 bins
    cameras: tuple[str, ...] = ("third", "wrist")  # shared vision encoder, one learned embedding per camera
    use_proprio: bool = True  # end-effector xyz + gripper as one extra token (OFT); OpenVLA uses none
    image_size: int = 96  # pixels, square
    vision_dim: int = 128  # ViT width; the conv stem turns 96 px into 6x6 = 36 patch tokens
    vision_layers: int = 1
    vision_heads: int = 4
    llm_dim: int = 128  # Llama-style decoder width
    llm_layers: int = 4
    llm_heads: int = 4
    llm_mlp: int = 384  # SwiGLU hidden width
    text_vocab: int = 84  # size of the shipped word vocabulary (vocab.json)
    text_len: int = 12  # instruction tokens incl. BOS, right-padded
    action_dim: int = 4  # Meta-World: xyz delta + gripper, each in [-1, 1]
    chunk: int = 4  # actions predicted per call, executed open-loop
    action_bins: int = 256  # token head: uniform bins over [-1, 1], the last 256 ids of the vocabulary
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        self.cameras = tuple(self.cameras)
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        bad = [c for c in self.cameras if c not in CAMERAS]
        if not self.cameras or bad:
            raise ValueError(f"cameras must be a non-empty subset of {CAMERAS}, got {self.cameras}")
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (conv stem stride), got {self.image_size}")
        for name in ("vision_dim", "llm_dim"):
            heads = self.vision_heads if name == "vision_dim" else self.llm_heads
            if getattr(self, name) % heads or (getattr(self, name) // heads) % 2:
                raise ValueError(f"{name}={getattr(self, name)} must split into an even head size")
        for f in ("chunk", "action_dim", "action_bins", "text_len", "llm_layers", "vision_layers"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")

    @property
    def vocab_size(self) -> int:
        return self.text_vocab + (self.action_bins if self.head == "token" else 0)

    @property
    def patches(self) -> int:
        return (self.image_size // 16) ** 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cameras"] = list(self.cameras)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MicroVLAConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
        return cls(**d)


VARIANTS: dict[str, MicroVLAConfig] = {
    "microvla-chunk": MicroVLAConfig(head="chunk", cameras=("third", "wrist"), use_proprio=True),
    "microvla-token": MicroVLAConfig(head="token", cameras=("third",), use_proprio=False),
}
