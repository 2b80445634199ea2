"""Write model artifacts and registry files (shipped ``synth7t/models`` or a ``--model-dir``).

Run ``python -m synth7t.export baseline`` to regenerate the shipped baseline parameters, its
card and the baseline entries of ``synth7t/models/registry.json``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import numpy as np

from .baseline import TISSUES, kmeans_1d, table_params, write_params
from .fields import CONTRASTS, SUPPORTED_BINS, bin_label
from .inference import save_unet
from .networks import UNet25D, UNetConfig, count_parameters
from .registry import MODELS_DIR, REGISTRY_FILE, SCHEMA, sha256_file

BASELINE_PARAMS = "baseline_params.json"
BASELINE_CARD = "baseline_card.json"
BASELINE_VERSION = "1.0.0"


def _dump(obj: dict, path: Path) -> Path:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    return path


def read_registry(folder: Path) -> list[dict]:
    """Raw entries of ``folder/registry.json`` (empty list if absent)."""
    path = folder / REGISTRY_FILE
    if not path.is_file():
        return []
    return list(json.loads(path.read_text()).get("models", []))


def write_registry(folder: Path, entries: list[dict]) -> Path:
    """Write ``folder/registry.json`` with entries sorted by (name, contrast, field bin)."""
    entries = sorted(entries, key=lambda e: (e["name"], CONTRASTS.index(e["contrast"]),
                                             float(e["field_bin"])))
    return _dump({"schema": SCHEMA, "models": entries}, folder / REGISTRY_FILE)


def merge_entries(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with entries of the same (name, contrast, field bin) replaced by ``new``."""
    key = lambda e: (e["name"], e["contrast"], float(e["field_bin"]))  # noqa: E731
    table = {key(e): e for e in old}
    table.update({key(e): e for e in new})
    return list(table.values())


def baseline_entries(folder: Path, *, names: tuple[str, ...] = ("baseline",),
                     note: str | None = None) -> list[dict]:
    """Registry entries for the baseline parameters file in ``folder`` for all 12 pairs."""
    sha = sha256_file(folder / BASELINE_PARAMS)
    out = []
    for name in names:
        for c in CONTRASTS:
            for b in SUPPORTED_BINS:
                e = {"name": name, "kind": "baseline", "contrast": c, "field_bin": b,
                     "version": BASELINE_VERSION, "file": BASELINE_PARAMS, "sha256": sha,
                     "card": BASELINE_CARD}
                if note and name != "baseline":
                    e["note"] = note
                out.append(e)
    return out


def write_baseline(folder: Path = MODELS_DIR, params: dict | None = None, *,
                   metrics: dict | None = None, default_to_baseline: bool = False) -> list[dict]:
    """Write the baseline parameters, its model card and registry entries into ``folder``.

    Parameters
    ----------
    folder
        Target folder (the shipped ``synth7t/models`` by default).
    params
        Baseline parameters; defaults to :func:`synth7t.baseline.table_params`.
    metrics
        Validation metrics for the card (from ``benchmarks/bench_quality.py``).
    default_to_baseline
        Also point the ``default`` entries at the baseline (until a deep model ships).
    """
    folder.mkdir(parents=True, exist_ok=True)
    params = params or table_params()
    write_params(params, folder / BASELINE_PARAMS)
    card_path = folder / BASELINE_CARD
    old_card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    card = {
        "Name": "baseline",
        "Kind": "baseline",
        "Version": BASELINE_VERSION,
        "Description": ("baseline: non-deep per-tissue intensity mapping to 7T (deterministic "
                        "3-class 1-D k-means of the in-mask source intensities, clusters named "
                        "CSF/GM/WM by the expected source contrast order, piecewise-linear map of "
                        "the class medians onto the normalised 7T tissue intensities)"),
        "TrainingData": "none (no learning); 7T tissue targets from "
                        + params.get("targets_source", "the FIELD_PHYSICS.md tables"),
        "Derivation": params.get("derivation", ""),
        "Metrics": metrics if metrics is not None else old_card.get("Metrics", {}),
        "SHA256": sha256_file(folder / BASELINE_PARAMS),
        "File": BASELINE_PARAMS,
    }
    _dump(card, card_path)
    names = ("baseline", "default") if default_to_baseline else ("baseline",)
    new = baseline_entries(folder, names=names,
                           note="default points to the non-deep baseline until a trained "
                                "model ships")
    merged = merge_entries(read_registry(folder), new)
    sha = card["SHA256"]
    for e in merged:  # any other entry pointing at the parameters file must follow its hash
        if e.get("file") == BASELINE_PARAMS:
            e["sha256"] = sha
    write_registry(folder, merged)
    return new


def simulator_params(sim=None, *, slabs: int = 4, depth: int = 8, seed: int = 0) -> dict:
    """Baseline parameters from the simulator and :mod:`synth7t.physics`.

    ``targets_7t``: per contrast, the 3-class k-means medians (the baseline's own classifier) of
    simulated ICBM152 7T targets (``slabs`` full-plane axial slabs spread over the brain, no
    deformation), named by the order of the 7T tissue signals. ``source_signal``: nominal-protocol
    tissue signals of ``synth7t.physics`` at each source field (only their order is used).
    """
    from .reference import REF_SHAPE

    if sim is None:
        from .simulate import Simulator

        sim = Simulator.from_icbm152()
    phys = sim.physics
    params = table_params()
    mask = sim.brain_mask()
    zs = np.flatnonzero(mask.any(axis=(0, 1)))
    starts = np.linspace(zs[0] + 0.2 * (zs[-1] - zs[0]), zs[0] + 0.8 * (zs[-1] - zs[0]),
                         slabs).astype(int)
    targets, sources = {}, {}
    for c in CONTRASTS:
        vals = []
        for k, z0 in enumerate(starts):
            roi = (slice(0, REF_SHAPE[0]), slice(0, REF_SHAPE[1]), slice(int(z0), int(z0) + depth))
            pair = sim.sample(contrast=c, field=SUPPORTED_BINS[0], seed=seed + k, roi=roi,
                              deform=False)
            t = pair["target"][pair["mask"]]
            vals.append(t[t > 0])
        _, med = kmeans_1d(np.concatenate(vals), 3)
        sig7 = phys.tissue_signals(c, 7.0, tissues=TISSUES)
        order7 = sorted(TISSUES, key=lambda t: sig7[t])
        targets[c] = {t: round(float(med[i]), 4) for i, t in enumerate(order7)}
        sources[c] = {}
        for b in SUPPORTED_BINS:
            sig = phys.tissue_signals(c, b, tissues=TISSUES)
            top = max(sig.values())
            sources[c][f"{b:g}"] = {t: round(v / top, 4) for t, v in sig.items()}
    params["targets_7t"] = targets
    params["source_signal"] = sources
    params["targets_source"] = "synth7t.simulate (ICBM152 7T targets) and synth7t.physics"
    params["derivation"] = (
        "targets_7t: per contrast, 3-class 1-D k-means medians (the baseline's own classifier) of "
        f"simulated ICBM152 7T targets (synth7t.simulate, {slabs} full-plane slabs of {depth} "
        "axial slices between 20 % and 80 % of the brain's axial extent, no deformation, seeds "
        f"{seed}..{seed + slabs - 1}), classes named CSF/GM/WM by the order of the 7T tissue "
        "signals of synth7t.physics (nominal 7T protocol). source_signal: tissue signals of "
        "synth7t.physics at the nominal protocol of each source field, relative to the brightest "
        "(only their order is used to name the source classes). Physics table: "
        "synth7t/data/physics.json (FIELD_PHYSICS.md).")
    return params


#: Limits every card of a model trained on the simulator must state (FIELD_PHYSICS.md).
SIMULATION_LIMITS = [
    "Trained only on simulated pairs (first-order signal model; ICBM152 and two real 3 T heads "
    "as anatomies, domain-randomised); fine-tune on real pairs (synth7t-train --init-from "
    "default --mrixfields/--bids) where they exist.",
    "FLAIR/T2w: GM/WM contrast comes from the design table's relaxation times plus a sourced "
    "first-order correction (invisible myelin water, incidental magnetisation transfer under the "
    "TSE refocusing train; physics.json tse_signal_modifiers); real 7T FLAIR contrast also "
    "depends on the vendor's variable-flip-angle train, which is not modelled.",
    "0.1 T inputs carry little fine detail; the model is trained to be faithful (L1 + SSIM to the "
    "simulated target), not to invent detail.",
    "The uncertainty map is the network's own estimate of its expected absolute error on "
    "simulated data (plus the test-time flips' disagreement when on, and the input's intensity "
    "clipped by the normalisation), not a guarantee. On held-out simulated anatomy "
    "(benchmarks/bench_uncertainty.py, model 2.7.0) it ranks the error (Spearman >= 0.4) on "
    "10 of 12 pairs and rises at least 2x on every unseen synthetic lesion, but it does not rank "
    "the small errors of T1w 3-5 T (Spearman 0.39 / 0.27; MAE 0.009-0.011), and its deciles of "
    "error rise monotonically on 6 of 12 pairs only. With UNetConfig.shrinkage the image is "
    "pulled toward its local mean where the map's error variance explains its local variation "
    "(synth7t.shrinkage); the map written is the head's for the image before that step, and a "
    "structure finer than 1 voxel that the head is unsure of (a lesion's edge) is softened. "
    "The App flags an input as out of "
    "distribution when more than 25 % of its brain lies above the pair's threshold: the larger "
    "of 0.05 and the map's 95th percentile over normal simulated brains (UNetConfig."
    "uncertainty_reference; 0.018-0.14 by pair), so a normal 0.1 T scan, whose expected error is "
    "mostly its noise, is not flagged for that alone.",
    "Protocols: trained on the design table's protocols with TE/TR/FA widened to about +-20 % "
    "and inversion times (MPRAGE, FLAIR TI/TR) to only +-3-8 %, because the first-order MPRAGE "
    "model makes CSF bright when TI moves. With every source parameter 20 % beyond those "
    "ranges' edges (benchmarks/bench_quality.py --outside-band edge) the model beats the input "
    "on 8 of 12 pairs on Colin27 (not T1w 1.5 T, T2w 1.5 T, FLAIR 3 T, T1w 5 T): check "
    "outputs from protocols far from the table (e.g. a FLAIR whose CSF is not nulled).",
    "0.1 T inputs noisier than training (training WM SNR 2.7-19.5, i.e. down to a 0.064 T "
    "scanner's): at WM SNR 0.8-2.4 with 2.8-3 mm voxels the synthetic 0.1 T T1w image has a "
    "better SSIM than the input but no better nRMSE (0.419 vs 0.416 on Colin27); the 0.1 T "
    "networks are told how far the brain's mean sits from training (level conditioning) but "
    "below that SNR there is little left to synthesise from.",
]


def export_from_run(run_dir: str | Path, folder: Path = MODELS_DIR, *, version: str = "1.0.0",
                    weights: str = "best", quality_json: str | Path | None = None,
                    name: str = "default") -> dict:
    """Export a (possibly still running) ``synth7t-train`` run into ``folder``.

    Reads ``run_dir/checkpoints/{weights}.safetensors`` and ``state.json``; the card records
    the recipe, data, loss curve, held-out metrics, wall time, the source commit (from
    ``run_dir/SOURCE_COMMIT`` when present) and, with ``quality_json``, the Colin27 table of
    ``benchmarks/bench_quality.py --json``. Keeps every other registry entry (the baselines).
    """
    run_dir = Path(run_dir)
    state = json.loads((run_dir / "checkpoints" / "state.json").read_text())
    best = state.get("best") or {}
    hist = state.get("history", [])
    commit = run_dir / "SOURCE_COMMIT"
    metrics = {"held_out_simulated_icbm152": best.get("metrics", {})}
    if quality_json:
        q = json.loads(Path(quality_json).read_text())
        metrics["colin27_simulated"] = {"where": q.get("where"), "seed": q.get("seed"),
                                        "mean": q.get("mean"), "per_pair": q.get("results")}
    wfile = run_dir / "checkpoints" / f"{weights}.safetensors"
    card = {
        "Description": "conditioned 2.5D U-Net (one network for all 12 (contrast, field) pairs; "
                       "FiLM conditioning on source field bin and contrast; 5 neighbouring axial "
                       "slices in; residual on the centre slice, clamped to [0, 1])"
                       + _input_text(wfile),
        "TrainingData": "; ".join(state["config"].get("data", [])),
        "Uncertainty": _uncertainty_text(wfile),
        "Recipe": state["config"],
        "Loss": _loss_text(_Cfg(state["config"])),
        "Steps": state["step"],
        "ExportedCheckpoint": weights,
        "BestStep": best.get("step"),
        "WallTimeSeconds": round(float(state.get("wall_seconds", 0.0)), 1),
        "SimulatorSeconds": round(float(state.get("data_seconds", 0.0)), 1),
        "SourceCommit": commit.read_text().strip() if commit.is_file() else None,
        "LossCurve": [h for h in hist if h["step"] in _curve_steps(hist, 25)],
        "ValidationHistory": state.get("val_history", []),
        "Metrics": metrics,
        "Limitations": SIMULATION_LIMITS,
        "Command": "see synth7t/models/TRAINING.md",
    }
    return export_model(run_dir / "checkpoints" / f"{weights}.safetensors", folder, name=name,
                        version=version, card=card, merge=True)


def export_model(weights: str | Path | UNet25D, out_dir: str | Path, *, name: str = "default",
                 version: str = "1.0.0", pairs: Iterable[tuple[str, float]] | None = None,
                 card: dict | None = None, file_name: str = "model.safetensors",
                 card_name: str = "model_card.json", merge: bool = False) -> dict:
    """Write ``model.safetensors``, ``model_card.json`` and ``registry.json`` into ``out_dir``.

    Parameters
    ----------
    weights
        A network or a safetensors checkpoint (e.g. ``checkpoints/best.safetensors``).
    pairs
        (contrast, field bin) pairs to register; all 12 by default.
    card
        Model-card fields (recipe, data, metrics, wall time...); SHA-256 and architecture are
        filled in here.
    merge
        Keep other entries already in ``out_dir/registry.json`` (used for ``synth7t/models``).
    """
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(weights, UNet25D):
        net = weights
    else:
        from safetensors import safe_open

        with safe_open(str(weights), framework="pt") as fh:
            cfg = UNetConfig.from_json(fh.metadata()["config"])
        net = UNet25D(cfg)
        net.load_state_dict(load_file(str(weights)))
    path = out_dir / file_name
    sha = save_unet(net, path, extra_metadata={"name": name, "version": version})
    pairs = list(pairs) if pairs is not None else [(c, b) for c in CONTRASTS for b in SUPPORTED_BINS]
    full_card = {"Name": name, "Kind": "unet", "Version": version,
                 "Architecture": {"class": "synth7t.networks.UNet25D",
                                  "config": json.loads(net.config.to_json()),
                                  "parameters": count_parameters(net)},
                 "Pairs": [f"{c}@{bin_label(b)}" for c, b in pairs]}
    full_card.update(card or {})
    full_card["SHA256"] = sha
    full_card["File"] = file_name
    full_card["SizeBytes"] = path.stat().st_size
    (out_dir / card_name).write_text(json.dumps(full_card, indent=1, default=float) + "\n")
    entries = [{"name": name, "kind": "unet", "contrast": c, "field_bin": float(b),
                "version": version, "file": file_name, "sha256": sha, "card": card_name}
               for c, b in pairs]
    old = read_registry(out_dir) if merge else []
    write_registry(out_dir, merge_entries(old, entries))
    return full_card


def default_card(trainer, *, data: list[str], notes: list[str] | None = None) -> dict:
    """Model-card fields of a finished run."""
    best = trainer.best or {}
    hist = trainer.history
    return {
        "Description": "conditioned 2.5D U-Net (one network for all (contrast, field) pairs, FiLM "
                       "conditioning on field bin and contrast, residual on the centre slice)",
        "TrainingData": "; ".join(data),
        "Recipe": asdict(trainer.cfg),
        "Loss": _loss_text(trainer.cfg),
        "Steps": trainer.step,
        "BestStep": best.get("step"),
        "WallTimeSeconds": round(trainer.wall, 1),
        "LossCurve": [h for h in hist if h["step"] in _curve_steps(hist)],
        "ValidationHistory": trainer.val_history,
        "Metrics": {"held_out_simulated": best.get("metrics", {})},
        "Notes": notes or [],
    }


def _curve_steps(hist: list[dict], n: int = 20) -> set[int]:
    if not hist:
        return set()
    idx = np.unique(np.linspace(0, len(hist) - 1, n).astype(int))
    return {hist[i]["step"] for i in idx}


def _loss_text(cfg) -> str:
    text = "L1 + (1 - SSIM), 7x7 uniform window"
    if getattr(cfg, "uncertainty", False):
        text += (f" + {cfg.unc_weight:g} x Laplace NLL of the target given the detached "
                 "prediction and the predicted scale b (uncertainty head)")
    if getattr(cfg, "level_weight", 0):
        text += (f" + {cfg.level_weight:g} x relative error of 4 mm block means inside the brain "
                 "(tissue levels; synth7t.train.level_loss)")
    if getattr(cfg, "ema_decay", 0):
        text += f"; exported weights: EMA (decay {cfg.ema_decay:g})"
    return text


def _metadata(weights: Path) -> tuple[dict, UNetConfig]:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as fh:
        meta = fh.metadata() or {}
    return meta, UNetConfig.from_json(meta.get("config", "{}"))


def _input_text(weights: Path) -> str:
    """How the exported network scales its input or reads its level (empty: neither)."""
    cfg = _metadata(weights)[1]
    text = ""
    if cfg.input_levels:
        text += ("; its [0, 1] input is first scaled so that the whole brain's mean sits at a "
                 "fixed level per pair (Architecture.config.input_levels; synth7t.intensity."
                 "source_gain): a scale that noise, hot voxels and bright lesions hardly move, "
                 "unlike the 99.8th percentile that sets the [0, 1] range")
    if cfg.level_condition:
        pairs = ", ".join(sorted(cfg.level_condition))
        text += (f"; for {pairs} its conditioning also carries log(whole-brain mean of the "
                 "[0, 1] source / the training average for the pair) (Architecture.config."
                 "level_condition; "
                 "synth7t.intensity.level_offset): the input keeps its 99.8th-percentile scale, "
                 "which noise inflates, and the network is told how far the brain's mean sits "
                 "from where training had it")
    if cfg.protocol_condition:
        text += ("; its conditioning also carries the source protocol (log(TR, TE, TI, flip "
                 "angle / the pair's nominal value), bounded, and a 'known' flag; "
                 "Architecture.config.protocol_condition; synth7t.networks.protocol_features), "
                 "which the BIDS App reads from the input's sidecar (RepetitionTime, EchoTime, "
                 "InversionTime, FlipAngle); trained with the protocol 'not known' on 30 % of "
                 "patches, as inputs without a sidecar (the challenge data) arrive")
    return text


def _uncertainty_text(weights: Path) -> str | None:
    """What the exported network's uncertainty output is (from its safetensors metadata)."""
    meta, cfg = _metadata(weights)
    if not cfg.uncertainty:
        return None
    text = ("per-voxel expected absolute error ([0, 1] units): Laplace scale b of the uncertainty "
            "head (synth7t.uncertainty)")
    if cfg.ood_clusters:
        text += ("; scaled by the feature-space novelty (squared Mahalanobis distance to the "
                 "nearest of the fitted clusters over its quantile, where above 1; synth7t.ood: "
                 + meta.get("ood", "") + ")")
    if cfg.uncertainty_reference:
        text += ("; out-of-distribution flag per pair from the map's reference level ("
                 + meta.get("uncertainty_reference", "") + "; UNetConfig.uncertainty_reference, "
                 "synth7t.uncertainty.summarise)")
    if cfg.shrinkage:
        text += ("; the image is shrunk toward its local mean by the share of its local variance "
                 "that the head's error variance 2 b^2 explains (Lee's local-statistics filter, "
                 "Gaussian neighbourhood of 1 voxel; UNetConfig.shrinkage, synth7t.shrinkage); "
                 "the map is the head's b for the unshrunk image")
    return text


class _Cfg:
    """Attribute view of a run's recorded config (for :func:`_loss_text`)."""

    def __init__(self, d: dict) -> None:
        self.__dict__.update(d)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m synth7t.export")
    parser.add_argument("what", choices=["baseline", "default"])
    parser.add_argument("--folder", type=Path, default=MODELS_DIR)
    parser.add_argument("--run", type=Path, help="synth7t-train --out folder (for 'default')")
    parser.add_argument("--weights", default="best",
                        help="checkpoint name in RUN/checkpoints (best, last, ema, best_ood...)")
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--quality-json", type=Path, help="bench_quality.py --json output")
    parser.add_argument("--default-to-baseline", action="store_true")
    parser.add_argument("--from-simulator", action="store_true",
                        help="derive the 7T targets from the simulator (else the design tables)")
    args = parser.parse_args(argv)
    if args.what == "default":
        if not args.run:
            parser.error("default needs --run")
        card = export_from_run(args.run, args.folder, version=args.version, weights=args.weights,
                               quality_json=args.quality_json)
        print(json.dumps({k: card[k] for k in ("SHA256", "Steps", "BestStep", "WallTimeSeconds")}))
        return 0
    params = simulator_params() if args.from_simulator else table_params()
    write_baseline(args.folder, params, default_to_baseline=args.default_to_baseline)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
