"""Behaviour cloning of a micro-VLA on demonstrations, on the CPU, deterministic and resumable.

Every random draw (batch indices, image shifts) is a pure function of (seed, step), so a run resumed from
its last checkpoint continues exactly as an uninterrupted one and the final weights hash matches.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from qvla.checkpoint import WEIGHTS, save_checkpoint, sha256
from qvla.cpu_mode import stage_mode
from qvla.demos import read_demos
from qvla.policies import POLICIES, build_policy
from qvla.policies.microvla.model import count_params, init_weights

log = logging.getLogger(__name__)
STATE = "train_state.safetensors"
AUX = "aux_state_head."  # key prefix of the auxiliary head in the resume weights


@dataclass
class TrainConfig:
    policy: str = "microvla-chunk"  # registered policy name
    steps: int = 6000  # optimizer steps
    batch_size: int = 64
    lr: float = 5e-4  # peak, after linear warm-up, cosine decay to lr/10
    warmup: int = 200  # steps
    weight_decay: float = 0.05
    shift: int = 6  # random-shift augmentation, pixels
    aux_state: float = 0.0  # weight of the auxiliary loss: predict hand/object/goal xyz (needs demo states)
    seed: int = 0
    threads: int = 2  # torch intra-op threads; results are reproducible for a fixed value
    save_every: int = 500  # steps between resumable checkpoints

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise KeyError(f"unknown policy {self.policy!r}; registered policies: {sorted(POLICIES)}")
        for f in ("steps", "batch_size", "threads", "save_every"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.shift < 0:
            raise ValueError(f"shift must be >= 0 pixels, got {self.shift}")
        if self.aux_state < 0:
            raise ValueError(f"aux_state must be >= 0, got {self.aux_state}")


class DemoTensors:
    """All demonstration frames in memory as tensors, with K-step action targets."""

    def __init__(self, demo_dir: str | Path, cameras: tuple[str, ...], chunk: int, text_of,
                 state: bool = False) -> None:
        manifest, episodes = read_demos(demo_dir)
        missing = [c for c in cameras if c not in manifest["cameras"]]
        if missing:
            raise ValueError(f"demos in {demo_dir} lack cameras {missing}; they have {manifest['cameras']}")
        lacking = [ep.id for ep in episodes if ep.state is None] if state else []
        if lacking:
            raise ValueError(f"the auxiliary state loss needs demo states; {len(lacking)} episodes of {demo_dir} "
                             f"have none (e.g. {lacking[0]}): add them with 'qvla demos --add-state {demo_dir}'")
        imgs, prop, acts, text = [], [], [], []
        self.state = torch.from_numpy(np.concatenate([aux_targets(ep.state) for ep in episodes])) if state else None
        for ep in episodes:
            T = len(ep.actions)
            imgs.append(np.stack([ep.images[c] for c in cameras], 1))
            prop.append(ep.proprio)
            idx = np.minimum(np.arange(T)[:, None] + np.arange(chunk)[None], T - 1)  # repeat the last action
            acts.append(ep.actions[idx])
            text.append(np.repeat(np.asarray(text_of(ep.instruction))[None], T, 0))
        self.images = torch.from_numpy(np.concatenate(imgs)).permute(0, 1, 4, 2, 3).contiguous()
        self.proprio = torch.from_numpy(np.concatenate(prop)).float()
        self.actions = torch.from_numpy(np.concatenate(acts)).float()
        self.text = torch.from_numpy(np.concatenate(text)).long()
        self.manifest = manifest

    def __len__(self) -> int:
        return len(self.actions)


def aux_targets(state: np.ndarray) -> np.ndarray:
    """(T, 9) hand, object, goal xyz -> (T, 12): those and the object relative to the hand (metres)."""
    return np.concatenate([state, state[:, 3:6] - state[:, :3]], 1).astype(np.float32)


class AuxStateHead(torch.nn.Module):
    """Training-only head: reads the decoder's outputs where actions are read (see action_positions_output;
    their mean) and predicts the standardized privileged state; it is not part of the policy and is not
    saved in the checkpoint."""

    def __init__(self, dim: int, targets: torch.Tensor) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(dim, targets.shape[1])
        self.register_buffer("mean", targets.mean(0))
        self.register_buffer("std", targets.std(0).clamp_min(1e-3))

    def loss(self, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(self.fc(hidden.mean(1)), (target - self.mean) / self.std, beta=0.1)


def action_positions_output(model, store: dict):
    """Forward hook on the decoder: keeps its outputs at the positions the actions are read from, where
    nothing of the target action is visible: the K action queries (chunk head), or the last prefix position,
    which predicts the first action token (token head; the later positions see teacher-forced actions)."""
    c = model.config
    n = c.chunk * (1 if c.head == "chunk" else c.action_dim)  # action positions at the end of the sequence
    keep = n if c.head == "chunk" else 1

    def hook(module, args, output):
        store["hidden"] = output[0][:, -n:][:, :keep]
    return hook


def random_shift(images: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """(B, C, 3, H, W) uint8 -> same shape, each image shifted by up to +-pad px (edge pixels repeated)."""
    if pad == 0:
        return images
    B, C, _, H, W = images.shape
    x = F.pad(images.flatten(0, 1).float(), (pad,) * 4, mode="replicate")
    off = torch.randint(0, 2 * pad + 1, (B * C, 2), generator=g)
    out = torch.stack([x[i, :, a:a + H, b:b + W] for i, (a, b) in enumerate(off.tolist())])
    return out.to(torch.uint8).view_as(images)


def loss_fn(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if model.config.head == "chunk":
        pred = model.forward_chunk(batch["images"], batch["text"], batch["proprio"])
        return (pred - batch["actions"]).abs().mean()
    ids = model.action_token_ids(batch["actions"].flatten(1))
    logits = model.forward_token_logits(batch["images"], batch["text"], batch["proprio"], ids)
    return F.cross_entropy(logits.flatten(0, 1), (ids - model.config.text_vocab).flatten())


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _flat_optimizer(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    flat = {}
    for i, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            flat[f"{i}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return flat


def _restore_optimizer(opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict] = {}
    for key, v in flat.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    sd["state"] = state
    opt.load_state_dict(sd)


@stage_mode()
def train(cfg: TrainConfig, data_dir: str | Path, out: str | Path) -> Path:
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "resume").is_dir():
        raise FileExistsError(f"{out} exists, is not empty and holds no resumable run; choose a new --out")
    policy = build_policy(cfg.policy)
    model = policy.model
    mc = policy.config
    data = DemoTensors(data_dir, mc.cameras, mc.chunk, lambda s: policy.tokenizer.encode(s, mc.text_len),
                       state=cfg.aux_state > 0)
    init_weights(model, cfg.seed)
    trained = torch.nn.ModuleDict({"policy": model})  # + the training-only auxiliary head
    store: dict = {}
    if cfg.aux_state > 0:
        with torch.random.fork_rng():  # the head's init is seeded; the process-wide RNG is left as it was
            torch.manual_seed(cfg.seed)
            trained["aux"] = AuxStateHead(mc.llm_dim, data.state)
        hook = model.llm.register_forward_hook(action_positions_output(model, store))
    decay = [p for n, p in trained.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in trained.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    start = 0
    state_file = out / "resume" / STATE
    if state_file.is_file():  # resume an interrupted run
        meta = json.loads((out / "resume" / "train_state.json").read_text())
        if {"aux_state": 0.0, **meta["train_config"]} != asdict(cfg):  # runs saved before aux_state existed
            raise ValueError(f"{out} holds a run with a different config {meta['train_config']}; use a new --out")
        weights = load_file(out / "resume" / WEIGHTS)
        model.load_state_dict({k: v for k, v in weights.items() if not k.startswith(AUX)})
        if cfg.aux_state > 0:
            trained["aux"].load_state_dict({k[len(AUX):]: v for k, v in weights.items() if k.startswith(AUX)})
        _restore_optimizer(opt, load_file(state_file))
        start = meta["step"]
        log.info("resuming %s at step %d", out, start)
    log.info("%s: %d parameters, %d frames", cfg.policy, count_params(model), len(data))
    model.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train {cfg.policy}")
    t0, ema, aux_ema = time.time(), None, None
    for step in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, len(data), (cfg.batch_size,), generator=g)
        batch = {"images": random_shift(data.images[idx], cfg.shift, g), "text": data.text[idx],
                 "proprio": data.proprio[idx], "actions": data.actions[idx]}
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss = action_loss = loss_fn(model, batch)
        if cfg.aux_state > 0:
            aux = trained["aux"].loss(store.pop("hidden"), data.state[idx])
            loss = action_loss + cfg.aux_state * aux
            aux_ema = aux.item() if aux_ema is None else 0.98 * aux_ema + 0.02 * aux.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        opt.step()
        ema = action_loss.item() if ema is None else 0.98 * ema + 0.02 * action_loss.item()
        bar.set_postfix(loss=f"{ema:.4f}", **({"aux": f"{aux_ema:.3f}"} if aux_ema is not None else {}))
        if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
            _save_resume(out, trained, opt, cfg, step + 1)
    if cfg.aux_state > 0:
        hook.remove()
    model.eval()
    meta = {"family": "microvla", "policy": cfg.policy, "config": mc.to_dict(),
            "training": {**asdict(cfg), "demos": str(data_dir), "frames": len(data),
                         "demo_episodes": len(data.manifest["episodes"]), "final_loss_ema": ema,
                         **({"final_aux_loss_ema": aux_ema} if aux_ema is not None else {}),
                         "seconds_this_run": round(time.time() - t0, 1)}}
    save_checkpoint(out, meta, model.state_dict())  # replaces the directory, resume state included
    log.info("weights sha256 %s", sha256(out / WEIGHTS))
    return out


def _save_resume(out: Path, trained: torch.nn.ModuleDict, opt, cfg: TrainConfig, step: int) -> None:
    """The policy's weights as a checkpoint has them, the auxiliary head's (if any) under AUX, the optimizer."""
    d = out / "resume"
    d.mkdir(parents=True, exist_ok=True)
    weights = dict(trained["policy"].state_dict())
    if "aux" in trained:
        weights.update({AUX + k: v for k, v in trained["aux"].state_dict().items()})
    save_file({k: v.contiguous() for k, v in weights.items()}, d / (WEIGHTS + ".tmp"))
    save_file(_flat_optimizer(opt), d / (STATE + ".tmp"))
    (d / "train_state.json.tmp").write_text(json.dumps({"step": step, "train_config": asdict(cfg)}))
    for name in (WEIGHTS, STATE, "train_state.json"):  # rename last so a crash never leaves a torn state
        (d / (name + ".tmp")).replace(d / name)
