"""Packed on-disk (and in-memory) form of a mixed-precision layer: pure tensor math.

A layer with N output channels and K inputs per channel (a conv's C*kh*kw) is stored as
  bits  int8 (N,)                   each channel's bit width (0, 2, 4, 8 or 16)
  w8    int8 (n8, K)                8-bit codes, symmetric: w = code * s8
  s8    fp32 (n8,)
  w4    uint8 (n4, ceil(K/2))       4-bit codes, two per byte:  w = (code - z4) * s4
  s4, z4 fp32 (n4,), uint8 (n4,)
  w2    uint8 (n2, ceil(K/4))       2-bit codes, four per byte: w = (code - z2) * s2
  s2, z2
  w16   fp16 (n16, K)               channels kept in floating point
  in_scale, in_shift fp32 (K,)      optional input transform x -> (x - in_shift) / in_scale (baselines)
  in_signs fp32 (K,)                optional rotation after it, x -> H diag(in_signs) x (rotation.py)
  a_clip   fp32 (1,)                optional activation clipping ratio in (0, 1] (activation_clip.py)
Rows of each bucket appear in channel order. 0-bit channels hold nothing.
"""
from __future__ import annotations

import torch

from qvla.quant.packing import pack, unpack
from qvla.quant.rotation import rotate_inputs

STORED_BITS = (2, 4, 8)
INPUT_KEYS = ("in_scale", "in_shift", "in_signs", "a_clip")  # the activation side of the layer's transform
INPUT_SHAPES = {"in_scale": "K", "in_shift": "K", "in_signs": "K", "a_clip": 1}  # a_clip: one ratio per layer


def to_storage(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: torch.Tensor,
               fp_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """From full-shape integer codes (N, ...) + per-channel scale/zero/bits + the 16-bit rows."""
    flat = codes.reshape(codes.shape[0], -1)
    out = {"bits": bits.to(torch.int8)}
    for b in STORED_BITS:
        rows = bits == b
        if rows.any():
            out[f"w{b}"] = pack(flat[rows].to(torch.int16) if b == 8 else flat[rows].to(torch.uint8), b)
            out[f"s{b}"] = scale[rows].float()
            if b != 8:
                out[f"z{b}"] = zero[rows].to(torch.uint8)
    if (bits == 16).any():
        out["w16"] = fp_rows.reshape(int((bits == 16).sum()), -1).to(torch.float16)
    return out


def bucket_codes(storage: dict[str, torch.Tensor], bits: int, k: int):
    """-> (codes (n, k), scale (n,), zero (n,)) for one stored bucket."""
    codes = unpack(storage[f"w{bits}"], bits, k)
    zero = storage[f"z{bits}"].float() if bits != 8 else torch.zeros(codes.shape[0])
    return codes, storage[f"s{bits}"], zero


def dequantize_storage(storage: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """The float weight (shape) the storage encodes; 0-bit channels are zero."""
    bits = storage["bits"].long()
    k = int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1
    w = torch.zeros(shape[0], k)
    for b in STORED_BITS:
        rows = bits == b
        if rows.any():
            codes, scale, zero = bucket_codes(storage, b, k)
            w[rows] = (codes.float() - zero[:, None]) * scale[:, None]
    if (bits == 16).any():
        w[bits == 16] = storage["w16"].float()
    return w.reshape(shape)


def storage_nbytes(storage: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in storage.values())


def input_transform_of(storage: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: storage[k].float() for k in INPUT_KEYS if k in storage}


def input_transform(x: torch.Tensor, inp: dict[str, torch.Tensor]) -> torch.Tensor:
    """x -> H D (x - in_shift) / in_scale, the activation side of an equivalent transform."""
    if "in_shift" in inp:
        x = x - inp["in_shift"]
    if "in_scale" in inp:
        x = x / inp["in_scale"]
    if "in_signs" in inp:
        x = rotate_inputs(x, inp["in_signs"])
    return x


def from_storage(storage: dict[str, torch.Tensor], shape) -> dict[str, torch.Tensor]:
    """Inverse of to_storage: full-shape codes (N, K) + per-channel scale / zero / bits + 16-bit rows."""
    bits = storage["bits"].long()
    k = int(torch.tensor(shape[1:]).prod())
    codes = torch.zeros(shape[0], k, dtype=torch.int8)
    scale, zero = torch.zeros(shape[0]), torch.zeros(shape[0])
    for b in STORED_BITS:
        rows = bits == b
        if rows.any():
            c, scale[rows], zero[rows] = bucket_codes(storage, b, k)
            codes[rows] = c.to(torch.int8)
    fp_rows = storage["w16"].float() if "w16" in storage else torch.zeros(0, k)
    fp_rows = fp_rows.reshape(-1, *shape[1:])  # the layer's own row shape, as quantize_weight_codes keeps it
    return {"codes": codes, "scale": scale, "zero": zero, "bits": bits.to(torch.int8), "fp_rows": fp_rows}


def permute_inputs(storage: dict[str, torch.Tensor], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """The storage of the same layer fed its inputs in the order `perm` (new input j = old input perm[j]):
    every row's codes and the per-input transform are permuted; per-row scales are unchanged."""
    k = len(perm)
    if "in_signs" in storage:
        raise ValueError("a layer with rotated inputs cannot take them permuted; do not fold into it")
    out = dict(storage)
    for b in STORED_BITS:
        if f"w{b}" in storage:
            out[f"w{b}"] = pack(unpack(storage[f"w{b}"], b, k)[:, perm].contiguous(), b)
    if "w16" in storage:
        out["w16"] = storage["w16"].reshape(-1, k)[:, perm].contiguous()
    for key in ("in_scale", "in_shift"):
        if key in storage:
            out[key] = storage[key][perm].contiguous()
    return out


def validate_storage(storage: dict[str, torch.Tensor], shape, where: str) -> None:
    """Refuses storage whose buckets do not match its bits vector or the layer's shape."""
    if "bits" not in storage:
        raise ValueError(f"{where}: no 'bits' tensor")
    bits = storage["bits"].long()
    if bits.shape != (shape[0],):
        raise ValueError(f"{where}: bits has shape {tuple(bits.shape)}, layer has {shape[0]} channels")
    k = int(torch.tensor(shape[1:]).prod())
    for key in INPUT_KEYS:
        want = (k if INPUT_SHAPES[key] == "K" else INPUT_SHAPES[key],)
        if key in storage and tuple(storage[key].shape) != want:
            raise ValueError(f"{where}: {key} has shape {tuple(storage[key].shape)}, expected {want}")
    if "a_clip" in storage and not bool(((storage["a_clip"] > 0) & (storage["a_clip"] <= 1)).all()):
        raise ValueError(f"{where}: a_clip must lie in (0, 1], got {storage['a_clip'].tolist()}")
    bad = sorted(set(bits.unique().tolist()) - {0, 2, 4, 8, 16})
    if "in_signs" in storage and not bool((storage["in_signs"].abs() == 1).all()):
        raise ValueError(f"{where}: in_signs must hold only +1 and -1")
    if bad:
        raise ValueError(f"{where}: bit widths {bad} not in (0, 2, 4, 8, 16)")
    for b in (*STORED_BITS, 16):
        n = int((bits == b).sum())
        key = f"w{b}"
        if n and key not in storage:
            raise ValueError(f"{where}: {n} channels at {b} bits but no {key!r} tensor")
        if key in storage:
            t = storage[key]
            width = k if b in (8, 16) else (k * b + 7) // 8
            if tuple(t.shape) != (n, width):
                raise ValueError(f"{where}: {key} has shape {tuple(t.shape)}, expected {(n, width)}")
        for aux in ((f"s{b}",) if b == 8 else (f"s{b}", f"z{b}") if b != 16 else ()):
            if n and (aux not in storage or tuple(storage[aux].shape) != (n,)):
                raise ValueError(f"{where}: {aux} missing or not of shape {(n,)}")
