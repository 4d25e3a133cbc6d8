"""Orchestration of the quantization stages: calibration -> sensitivity -> plan -> quantized checkpoint.

Each stage reads the previous stage's artifact; sensitivities are cached next to the calibration data,
keyed by everything that determines them, so a rerun with the same inputs reuses them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

import torch
from tqdm import tqdm

from qvla.calibrate import load_calibration
from qvla.checkpoint import WEIGHTS, read_meta, save_checkpoint, sha256
from qvla.cpu_mode import stage_mode
from qvla.quant import sensitivity as S
from qvla.quant.action_tuning import tune_to_actions
from qvla.quant.activation_clip import clip_activations
from qvla.quant.apply import quantize_, quantized_tensors
from qvla.quant.bias_correction import correct_biases
from qvla.quant.layer_calibration import calibrate_layers
from qvla.quant.methods import METHODS, NEEDS, TRANSFORMED, QuantConfig, transforms_for
from qvla.quant.methods.qvla import make_plan as qvla_plan

log = logging.getLogger(__name__)


def _load(policy_ref: str, calib: str | Path, suite: str | None):
    from qvla.policies import load_policy, resolve

    path = resolve(policy_ref)
    policy = load_policy(path)
    if read_meta(path).get("quantization"):
        raise ValueError(f"{path} is already quantized; quantize the full-precision policy")
    weights = sha256(Path(path) / WEIGHTS)
    manifest, observations = load_policy_calibration(calib, suite, weights, path)
    return path, policy, manifest, observations, weights


def load_policy_calibration(calib: str | Path, suite: str | None, weights: str, policy: str | Path
                            ) -> tuple[dict, list]:
    """load_calibration, refusing data collected with another policy than the one whose weights hash to `weights`."""
    manifest, observations = load_calibration(calib, suite)
    if manifest["weights_sha256"] != weights:
        raise ValueError(f"calibration data in {calib} was collected with another policy "
                         f"({manifest['policy']}, weights {manifest['weights_sha256'][:12]}), not {policy}")
    return manifest, observations


def _digest(transforms: dict[str, dict[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for n in sorted(transforms):
        for k in sorted(transforms[n]):
            h.update(f"{n}::{k}".encode())
            h.update(transforms[n][k].float().contiguous().numpy().tobytes())
    return h.hexdigest()


def step_weights(observations, weighting: str) -> torch.Tensor:
    return S.step_weights([(o.extras or {}).get("episode") for o in observations], weighting)


def sensitivity_for(policy, observations, manifest: dict, calib: str | Path, form: str, a_bits: int,
                    batch_size: int = 16, probes: int | None = None, cache: bool = True,
                    transforms: tuple[str, dict] | None = None, weighting: str = "steps", table: str = "projected"
                    ) -> tuple[S.Sensitivity, Path]:
    """transforms: (label, layer -> transform) to measure the transformed layers (keyed by their digest).
    A cached file made before the table the allocation reads existed (energy) is measured again and replaced."""
    parts = [manifest["weights_sha256"], form, a_bits, len(observations), batch_size, probes,
             [e["id"] for e in manifest["episodes"]]]
    if transforms:
        parts.append(_digest(transforms[1]))
    if weighting != "steps":  # the default keeps the keys of tables computed before weightings existed
        parts.append(weighting)
    if a_bits == 4:  # A4 sensitivities made on the earlier symmetric grid are not reused
        parts.append("a4-asymmetric")
    if all("sha256" in e for e in manifest["episodes"]):  # tables of manifests without digests keep their keys
        parts.append([e["sha256"] for e in manifest["episodes"]])
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]
    label = (f"-{transforms[0]}" if transforms else "") + (f"-{weighting}" if weighting != "steps" else "")
    file = Path(calib) / f"sensitivity-{form}-a{a_bits}{label}-{key}.safetensors"
    if cache and file.is_file():
        sens = S.load(file)[0]
        if getattr(sens, table):
            log.info("reusing %s", file)
            return sens, file
        log.info("%s has no %s table: measuring again", file, table)
    sens = S.compute(policy, observations, form=form, a_bits=a_bits, batch_size=batch_size, probes=probes,
                     progress=lambda it: tqdm(it, desc=f"sensitivity ({form}, A{a_bits}{label})", unit="batch"),
                     transforms=transforms, weights=step_weights(observations, weighting))
    if weighting != "steps":
        sens.meta["weighting"] = weighting
    S.save(file, sens, {"policy": policy.name, "weights_sha256": manifest["weights_sha256"],
                        "calibration": str(calib), "episodes": [e["id"] for e in manifest["episodes"]]})
    return sens, file


def tuning_steps(policy_ref: str, weights: str, calib: str | Path, dirs: list, suite: str | None
                 ) -> tuple[list, list[dict]]:
    """-> (observations, their sources for the provenance) of the extra calibration directories the action
    tuning also fits (`--tune-on`), typically collected with `qvla calibrate --acting CKPT`: the states a
    quantized policy reaches, labelled by the full-precision policy's actions. Each must be of the policy whose
    weights hash to `weights`, and none may repeat --calib or another (its steps would sit on both sides of the
    held-out split). Episode ids get a prefix per directory, so that every acted episode is split on its own;
    "twin" keeps the id it had, which picks its held-out segment (the same as its --calib twin's)."""
    extra, sources = [], []
    seen = {Path(calib).resolve()}
    for k, d in enumerate(dirs):
        if Path(d).resolve() in seen:
            raise ValueError(f"--tune-on {d} repeats --calib or another --tune-on directory")
        seen.add(Path(d).resolve())
        manifest, observations = load_policy_calibration(d, suite, weights, policy_ref)
        for o in observations:
            o.extras = {**o.extras, "episode": f"tune{k}:{o.extras['episode']}", "twin": o.extras["episode"]}
        extra += observations
        sources.append({"calibration": str(d), "episodes": len(manifest["episodes"]), "steps": len(observations),
                        "acted_by": manifest.get("acted_by"), "ids": [e["id"] for e in manifest["episodes"]]})
    return extra, sources


@stage_mode()
def quantize(policy_ref: str, cfg: QuantConfig, calib: str | Path | None, out: str | Path,
             suite: str = "mt10", tune_on: list | None = None) -> Path:
    """Builds the plan with the configured method, applies it and writes the quantized checkpoint.
    tune_on: further calibration directories whose steps the action tuning (+at) fits besides --calib's
    (the sensitivities and the plan come from --calib alone)."""
    from qvla.policies import load_policy, resolve

    provenance: dict = {"policy_ref": str(policy_ref), "config": {**cfg.__dict__, "no_prune": list(cfg.no_prune)}}
    needs = NEEDS[cfg.method]
    if tune_on and not cfg.action_tune:
        raise ValueError(f"--tune-on adds steps to the action tuning, which {cfg.method} does not run (suffix '+at')")
    acted: list = []  # the --tune-on steps; the plan's provenance gets their sources from every method
    if tune_on:  # checked before any stage runs
        if calib is None:
            raise ValueError("--tune-on needs --calib (the plan's calibration)")
        acted, provenance["tune_on"] = tuning_steps(policy_ref, sha256(resolve(policy_ref) / WEIGHTS), calib,
                                                    tune_on, suite)

    def tune(policy, plan, observations):
        observations = observations + acted
        return tune_to_actions(policy, plan, observations, cfg.form, step_weights(observations, cfg.weighting),
                               log=log.info)

    refine = [(f, label) for f, on, label in ((clip_activations, cfg.act_clip, "activation clipping (+ac)"),
                                                (correct_biases, cfg.bias_correct, "bias correction (+bc)"),
                                                (tune, cfg.action_tune, "action tuning (+at)")) if on]
    if refine and calib is None:
        raise ValueError(f"{refine[0][1]} of {cfg.method} needs --calib (a directory written by 'qvla calibrate')")
    if needs is None and not refine:
        path = resolve(policy_ref)
        policy = load_policy(path)
        plan = METHODS[cfg.method](policy, cfg, None, provenance)
        weights = sha256(Path(path) / WEIGHTS)
    else:
        if calib is None:
            raise ValueError(f"method {cfg.method} needs --calib (a directory written by 'qvla calibrate')")
        path, policy, manifest, observations, weights = _load(policy_ref, calib, suite)
        # the ids travel with the plan: a later stage (qvla select) must know them without the calibration folder
        provenance.update({"calibration": str(calib), "calibration_episodes": len(manifest["episodes"]),
                           "calibration_ids": [e["id"] for e in manifest["episodes"]]})
        transforms = None
        if needs in ("sensitivity", "both", "transformed"):
            if needs == "transformed":  # measured on the layers after the method's own transforms
                transforms = (TRANSFORMED[cfg.method], transforms_for(cfg.method)(policy, cfg, observations))
            sens, file = sensitivity_for(policy, observations, manifest, calib, cfg.form, cfg.a_bits,
                                         cfg.batch_size, cfg.probes, transforms=transforms, weighting=cfg.weighting,
                                         table=cfg.proxy)
            provenance["sensitivity_file"] = str(file)
            if cfg.layer_calibrate:
                sens = calibrate_layers(policy, sens, lambda s: qvla_plan(policy, cfg, s).bits, observations,
                                        cfg.proxy, step_weights(observations, cfg.weighting),
                                        transforms=transforms[1] if transforms else None, log=log.info,
                                        prune_apart=cfg.layer_calibrate_prune,
                                        baseline="linearized" if cfg.layer_calibrate_linear else "channels")
        # what each kind of method calibrates on; the baselines ("observations") per layer on the same steps
        calibration = {None: lambda: None, "observations": lambda: observations, "sensitivity": lambda: sens,
                       "both": lambda: (sens, observations), "transformed": lambda: (sens, transforms[1], observations)}[needs]()
        plan = METHODS[cfg.method](policy, cfg, calibration, provenance)
        if cfg.layer_calibrate:
            plan.method += "+lcp" if cfg.layer_calibrate_prune else "+lcl" if cfg.layer_calibrate_linear else "+lc"
        for stage, _ in refine:  # activation clipping, bias correction (which sees the clipped layer), action tuning
            plan = stage(policy, plan, observations)
    plan.provenance["weights_sha256"] = weights
    quantize_(policy, plan)
    meta = read_meta(path)
    with tempfile.TemporaryDirectory() as tmp:
        plan.save(tmp)
        extra = {f.name: f.read_bytes() for f in sorted(Path(tmp).iterdir())}
    quant = {"method": plan.method, "w_bits": cfg.w_bits, "a_bits": cfg.a_bits,
             "average_bits": plan.average_bits, "source": str(path), "source_weights_sha256": weights,
             **({"tune_on": [d["calibration"] for d in provenance["tune_on"]]} if tune_on else {})}
    save_checkpoint(out, {"family": meta["family"], "policy": f"{meta.get('policy', path)}+{plan.method}"
                          f"-w{cfg.w_bits:g}a{cfg.a_bits}", "config": meta["config"], "quantization": quant},
                    quantized_tensors(policy), extra_files=extra)
    return Path(out)


@stage_mode()
def run_sensitivity(policy_ref: str, calib: str | Path, out: str | Path, form: str = "action",
                    a_bits: int = 16, validate_k: int = 0, suite: str | None = None, seed: int = 0,
                    probes: int | None = None) -> dict:
    """`qvla sensitivity`: computes (or reuses) the tables, copies them to `out`, optionally validates."""
    path, policy, manifest, observations, weights = _load(policy_ref, calib, suite)
    sens, file = sensitivity_for(policy, observations, manifest, calib, form, a_bits, probes=probes)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(file.read_bytes())
    report = {"policy": policy.name, "form": form, "a_bits": a_bits, "observations": len(observations),
              "episodes": len(manifest["episodes"]), "seconds": sens.meta["seconds"],
              "layers": len(sens.product), "channels": sum(len(v) for v in sens.product.values())}
    if validate_k:
        v = S.validate(policy, observations, sens, validate_k, seed=seed,
                       progress=lambda it: tqdm(it, desc="validate", unit="triple"))
        report["validation"] = v
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    return report
