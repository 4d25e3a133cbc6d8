"""qvla bench: the JSON it writes has the documented keys and consistent numbers (timings are not asserted)."""
from __future__ import annotations

import json

import pytest
import torch

from qvla.bench import run_bench
from qvla.cli import main
from qvla.cpu_mode import flushing_denormals
from qvla.quant.methods import QuantConfig
from qvla.quant.pipeline import quantize

KEYS = {"latency_ms", "latency_ms_fp32", "latency_ms_bf16", "weight_bytes", "weight_bytes_bf16", "average_bits",
        "device", "latency_ms_per_role", "checkpoint_bytes"}


@pytest.fixture(scope="module")
def rtn4(chunk_ckpt, tmp_path_factory):
    return quantize(str(chunk_ckpt), QuantConfig(method="rtn", w_bits=4), None, tmp_path_factory.mktemp("b") / "q")


def test_bench_reports_memory_and_latency_of_all_three_forms(rtn4, tmp_path):
    r = run_bench(str(rtn4), tmp_path / "b.json", runs=2, warmup=1, threads=1)
    assert KEYS <= set(r) and json.loads((tmp_path / "b.json").read_text())["average_bits"] == 4.0
    assert r["weight_bytes_bf16"] * 2 == r["weight_bytes_fp32"]
    assert r["weight_bytes"] < 0.4 * r["weight_bytes_bf16"]  # 4-bit codes + scales + the float rest
    assert r["checkpoint_bytes"] < 0.4 * r["weight_bytes_bf16"]
    assert set(r["latency_ms_per_role"]["policy"]) >= {"vision", "llm", "action_head"}
    assert all(r[k] > 0 for k in ("latency_ms", "latency_ms_fp32", "latency_ms_bf16"))
    assert r["kernels"] == "real" and r["device"]["threads"] == 1


def test_bench_gives_the_callers_cpu_mode_back(rtn4):
    threads = torch.get_num_threads()
    torch.set_flush_denormal(False)
    run_bench(str(rtn4), None, runs=1, warmup=0, threads=1)
    assert not flushing_denormals() and torch.get_num_threads() == threads


def test_bench_cli_refuses_zero_runs(rtn4, capsys):
    assert main(["bench", "--policy", str(rtn4), "--runs", "0"]) == 2
    assert "--runs must be >= 1" in capsys.readouterr().err


CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: {family}
model\t\t: {model}
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx2 {extra}

processor\t: 1
vendor_id\t: GenuineIntel
"""


@pytest.mark.parametrize("family,model,extra,uarch", [
    (25, 17, "avx512f avx512_bf16", "Zen 4"), (25, 1, "", "Zen 3"), (26, 2, "avx512f", "Zen 5"),
    (23, 49, "", "Zen 2"), (99, 1, "", "AuthenticAMD family 99 model 1")])
def test_the_device_record_names_the_microarchitecture(family, model, extra, uarch):
    from qvla.bench import cpu_uarch

    r = cpu_uarch(CPUINFO.format(family=family, model=model, extra=extra))
    assert r == {"vendor": "AuthenticAMD", "family": family, "model": model, "uarch": uarch}


def test_a_cpuinfo_without_a_family_gives_no_uarch():
    from qvla.bench import cpu_uarch

    assert cpu_uarch("processor\t: 0\nBogoMIPS\t: 50.00\n") == {}
