"""`qvla bench`: batch-1 control-step latency and weight memory of a policy against its fp32 and bf16 forms.

The three forms (the policy as loaded, the float source in fp32, the same in bf16) are timed
interleaved in one process, so drift in clock speed or load hits all three alike; each number is the
median over `runs` control steps after `warmup` steps. Per module role, the time spent inside that
role's quantizable layers is measured with forward hooks in a separate pass (hooks cost time, so the
whole-step numbers are taken without them).
"""
from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch

from qvla import allocator
from qvla.cpu_mode import stage_mode
from qvla.envs import Observation


def _cpuinfo() -> str:
    """/proc/cpuinfo, or "" where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_name(cpuinfo: str | None = None) -> str:
    """The first CPU's model name (cpuinfo: /proc/cpuinfo's text, read here when not given)."""
    name = _cpuinfo_fields(_cpuinfo() if cpuinfo is None else cpuinfo).get("model name")
    return name or platform.processor() or platform.machine()


def _cpuinfo_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the first processor's block is enough
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


# (vendor, family) -> the microarchitecture, as a function of model and flags where a family spans two.
# A VM often names every AMD CPU "AMD EPYC", so the model name alone cannot tell Zen 4 from Zen 5.
UARCH = {
    ("AuthenticAMD", 23): lambda model, flags: "Zen 2" if model >= 0x30 else "Zen / Zen+",
    ("AuthenticAMD", 25): lambda model, flags: "Zen 4" if "avx512f" in flags else "Zen 3",
    ("AuthenticAMD", 26): lambda model, flags: "Zen 5",
}


def cpu_uarch(cpuinfo: str) -> dict:
    """Vendor, family, model and (from the table above) the microarchitecture of the first CPU in /proc/cpuinfo."""
    f = _cpuinfo_fields(cpuinfo)
    if "cpu family" not in f:
        return {}
    vendor, family, model = f.get("vendor_id", ""), int(f["cpu family"]), int(f.get("model", "0"))
    name = UARCH.get((vendor, family))
    return {"vendor": vendor, "family": family, "model": model,
            "uarch": name(model, set(f.get("flags", "").split())) if name else f"{vendor} family {family} model {model}"}


def device_info(threads: int) -> dict:
    from qvla.quant import kernels, lowbit

    cpuinfo = _cpuinfo()
    return {"cpu": cpu_name(cpuinfo), **cpu_uarch(cpuinfo), "cores": os.cpu_count(), "threads": threads,
            "isa": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
            "lowbit_kernel": f"qvla-lowbit ({lowbit.isa()})" if lowbit.available() else "torch int4 (bf16)",
            "int8_gemm": kernels.int8_gemm(), "malloc": allocator.state()["malloc"]}


def fixed_observation(policy, seed: int = 0) -> Observation:
    """A deterministic observation with the policy's cameras and image size (content does not change timing)."""
    c = policy.config
    rng = np.random.default_rng(seed)
    images = {cam: rng.integers(0, 256, (c.image_size, c.image_size, 3), dtype=np.uint8) for cam in c.cameras}
    return Observation(images, rng.uniform(-0.5, 0.5, 4).astype(np.float32), "open the drawer", "drawer-open")


def float_bytes(model: torch.nn.Module, bytes_per_value: int) -> int:
    return sum(v.numel() for v in model.state_dict().values() if v.is_floating_point()) * bytes_per_value


def _step(policy, obs: Observation, bf16: bool) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
        t = time.perf_counter()
        policy.act(obs)
        return (time.perf_counter() - t) * 1e3


@contextmanager
def role_timers(policy, totals: dict[str, float]):
    """Adds the wall time spent inside each role's quantizable layers to totals[role] (ms)."""
    roles = policy.module_roles()
    mods = dict(policy.model.named_modules())
    start: dict[str, float] = {}
    handles = []
    for name, role in roles.items():
        m = mods[name]
        handles.append(m.register_forward_pre_hook(lambda _m, _i, n=name: start.__setitem__(n, time.perf_counter())))
        handles.append(m.register_forward_hook(
            lambda _m, _i, _o, n=name, r=role: totals.__setitem__(r, totals[r] + (time.perf_counter() - start[n]) * 1e3)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@stage_mode()
def run_bench(policy_ref: str, out: str | Path | None = None, runs: int = 50, warmup: int = 5,
              threads: int = 2) -> dict:
    from qvla.checkpoint import WEIGHTS, read_meta
    from qvla.policies import load_policy, resolve
    from qvla.quant.apply import weight_nbytes

    if runs < 1 or warmup < 0:
        raise ValueError(f"--runs must be >= 1 and --warmup >= 0, got {runs} and {warmup}")
    torch.set_num_threads(threads)
    allocator.keep_freed_memory()  # every form below runs with it (see qvla.allocator)
    path = resolve(policy_ref)
    meta = read_meta(path)
    policy = load_policy(path)
    quant = meta.get("quantization")
    source = load_policy(quant["source"]) if quant else policy
    bf16 = copy.deepcopy(source)
    bf16.model.to(torch.bfloat16)
    forms = {"policy": (policy, False), "fp32": (source, False), "bf16": (bf16, True)}
    obs = fixed_observation(policy)
    times: dict[str, list[float]] = defaultdict(list)
    for i in range(warmup + runs):
        for name, (p, b) in forms.items():
            ms = _step(p, obs, b)
            if i >= warmup:
                times[name].append(ms)
    per_role, n = {}, max(3, runs // 5)  # hooked steps per form
    for name, (p, b) in forms.items():
        totals: dict[str, float] = defaultdict(float)
        with role_timers(p, totals):
            for _ in range(n):
                _step(p, obs, b)
        per_role[name] = {r: round(v / n, 3) for r, v in sorted(totals.items())}
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "policy": getattr(policy, "name", str(path)), "checkpoint": str(path),
        "kernels": getattr(policy, "kernels", "float"),
        "latency_ms": med["policy"], "latency_ms_fp32": med["fp32"], "latency_ms_bf16": med["bf16"],
        "speedup_vs_fp32": med["fp32"] / med["policy"], "speedup_vs_bf16": med["bf16"] / med["policy"],
        "latency_ms_per_role": per_role,
        "weight_bytes": weight_nbytes(policy.model), "weight_bytes_fp32": float_bytes(source.model, 4),
        "weight_bytes_bf16": float_bytes(source.model, 2),
        "checkpoint_bytes": (Path(path) / WEIGHTS).stat().st_size,
        "average_bits": quant["average_bits"] if quant else 32.0,
        "runs": runs, "warmup": warmup, "device": device_info(threads),
    }
    result["weight_ratio_bf16"] = result["weight_bytes"] / result["weight_bytes_bf16"]
    result["checkpoint_ratio_bf16"] = result["checkpoint_bytes"] / result["weight_bytes_bf16"]
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    return result


def format_bench(r: dict) -> str:
    mb = lambda b: f"{b / 2**20:.2f} MB"  # noqa: E731
    return "\n".join([
        f"{r['policy']} ({r['kernels']} kernels, {r['average_bits']:.2f} bits/weight) on {r['device']['cpu']}, "
        f"{r['device']['threads']} threads",
        f"  control step: {r['latency_ms']:.2f} ms | fp32 {r['latency_ms_fp32']:.2f} ms "
        f"({r['speedup_vs_fp32']:.2f}x) | bf16 {r['latency_ms_bf16']:.2f} ms ({r['speedup_vs_bf16']:.2f}x)",
        f"  weights in memory: {mb(r['weight_bytes'])} = {r['weight_ratio_bf16']:.3f}x bf16 ({mb(r['weight_bytes_bf16'])}); "
        f"on disk {mb(r['checkpoint_bytes'])} = {r['checkpoint_ratio_bf16']:.3f}x bf16",
    ])
