"""Checkpoint directories: safetensors weights + a JSON config that carries a SHA-256 per file.

No pickle anywhere: loading reads tensors and JSON only, so it never executes code from the checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from qvla.atomic import atomic_directory

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
FORMAT = "qvla-checkpoint/1"


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(out: str | Path, meta: dict, tensors: dict[str, torch.Tensor],
                    extra_files: dict[str, bytes] | None = None) -> Path:
    """Writes DIR/config.json (meta + checksums) and DIR/model.safetensors atomically (temp dir + rename)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"cannot write checkpoint under {out.parent}: directory is not writable")
    with atomic_directory(out, ".ckpt-") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / WEIGHTS)
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        files = {p.name: sha256(p) for p in sorted(tmp.iterdir())}
        (tmp / CONFIG).write_text(json.dumps({"format": FORMAT, **meta, "files": files}, indent=1))
    return out


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"checkpoint {path} is missing {CONFIG}")
    meta = json.loads((path / CONFIG).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path / CONFIG}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_checkpoint(path: str | Path, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (meta, tensors). Refuses a missing file or one whose checksum differs from the config's."""
    path = Path(path)
    meta = read_meta(path)
    for name, digest in meta.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise FileNotFoundError(f"checkpoint {path} is missing {name}")
        if verify and sha256(f) != digest:
            raise ValueError(f"checkpoint {path}: checksum mismatch for {name} (file changed or corrupted)")
    if WEIGHTS not in meta.get("files", {}):
        raise FileNotFoundError(f"checkpoint {path} lists no {WEIGHTS}")
    return meta, load_file(path / WEIGHTS)


def load_state_strict(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict with errors that name every missing, unexpected or mis-shaped tensor."""
    own = module.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in tensors and tensors[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint {where} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}")
    module.load_state_dict(tensors)
