"""``synth7t-train``: train or fine-tune the conditioned 2.5D U-Net.

Examples
--------
Shipped default (simulated ICBM152 pairs, all 12 pairs), see ``synth7t/models/TRAINING.md``::

    synth7t-train --simulated --out /work/train_run --steps 6000 --threads 1 --seed 0

Fine-tune the shipped model on a real MRIxFields tree, or on a BIDS dataset with a 7T session::

    synth7t-train --init-from default --mrixfields /data/MRIxFields2026 --out ft --steps 500
    synth7t-train --init-from default --bids /data/bids --out ft --steps 500

Self-supervised pretraining on unpaired images (MRIxFields ``R_`` volumes or BIDS
T1w/T2w/FLAIR; masked-image modelling, see ``synth7t.pretrain``), then fine-tuning from it::

    synth7t-train --pretrain-unpaired /data/MRIxFields2026 --out pre --steps 4000
    synth7t-train --init-from pretrained --model-dir pre --simulated --out ft --steps 4000 --lr 1e-3

The result in ``--out`` (``model.safetensors``, ``model_card.json``, ``registry.json``) is a
``--model-dir`` for ``synth7t`` and ``synth7t-mrixfields``. A pretrained model (registry name
``pretrained``) is only a starting point for fine-tuning, not a synthesis model.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from synth7t.anatomy import TRAINING_CSF_CHANGE, TRAINING_PV_SHARPNESS
from synth7t.intensity import INPUT_SCALINGS


def _pv_text(randomiser) -> str:
    """The partial-volume randomisation of a run, for its data description."""
    text = ""
    if randomiser.sharpness != (1.0, 1.0):
        text += "partial-volume sharpening exponent %g-%g, " % randomiser.sharpness
    if randomiser.csf_change != (0.0, 0.0):
        text += "CSF widening/narrowing %g to %g, " % randomiser.csf_change
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="synth7t-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data (at least one; --simulated when none is given)")
    d.add_argument("--simulated", action="store_true",
                   help="pairs simulated on the fly from ICBM152 (+ --anatomies), every slab "
                        "a new randomised brain")
    d.add_argument("--anatomies", nargs="+", type=Path, default=[], metavar="NPZ",
                   help="extra simulator anatomies (scripts/make_training_anatomies.py output)")
    d.add_argument("--icbm-weight", type=float, default=1.0, metavar="W",
                   help="sampling weight of ICBM152 against 1 for each --anatomies brain "
                        "(0: only --anatomies)")
    d.add_argument("--no-randomise", action="store_true",
                   help="plain simulator: no label/texture/relaxation randomisation, "
                        "physics.json ranges instead of the widened training ranges")
    d.add_argument("--pv-sharpness", nargs=2, type=float, default=list(TRAINING_PV_SHARPNESS),
                   metavar=("LO", "HI"),
                   help="range of the per-brain partial-volume sharpening exponent (1 1: off; "
                        "synth7t.sources.sharpen_partial_volume)")
    d.add_argument("--csf-change", nargs=2, type=float, default=list(TRAINING_CSF_CHANGE),
                   metavar=("LO", "HI"),
                   help="range of the per-brain widening (> 0) or narrowing (< 0) of the CSF "
                        "spaces (0 0: off; synth7t.sources.change_csf)")
    d.add_argument("--mrixfields", type=Path, metavar="DIR",
                   help="MRIxFields tree with paired P_ volumes (7T as target)")
    d.add_argument("--mrixfields-split", nargs="+", default=["Training_prospective"])
    d.add_argument("--bids", type=Path, metavar="DIR",
                   help="BIDS dataset with lower-field and 7T sessions of the same participants")
    d.add_argument("--bids-to-reference", action="store_true",
                   help="also bring BIDS pairs into the 0.5 mm reference grid")
    d.add_argument("--work-dir", type=Path, help="scratch for registered BIDS pairs "
                   "(default OUT/work)")
    d.add_argument("--contrasts", nargs="+", default=None, help="subset of T1w T2w FLAIR")
    d.add_argument("--fields", nargs="+", type=float, default=None, help="subset of 0.1 1.5 3 5")
    pt = p.add_argument_group(
        "self-supervised pretraining (instead of the paired data above)",
        "Masked-image modelling on unpaired images: hidden cells of the 2.5D input are\n"
        "reconstructed (L1 + 1 - SSIM on hidden brain pixels). Writes a model named\n"
        "'pretrained' (--name) into --out; then fine-tune it with\n"
        "  synth7t-train --init-from pretrained --model-dir OUT --simulated|--mrixfields|--bids\n"
        "(see synth7t/models/TRAINING.md). --fields may include 7.")
    pt.add_argument("--pretrain-unpaired", type=Path, metavar="DIR",
                    help="MRIxFields tree (every R_ volume) or BIDS dataset (every T1w/T2w/FLAIR; "
                         "field from MagneticFieldStrength when given)")
    pt.add_argument("--mask-ratio", type=float, default=0.5, help="fraction of cells hidden")
    pt.add_argument("--mask-patch", type=int, default=16, help="cell edge (pixels)")
    pt.add_argument("--tube-fraction", type=float, default=0.5,
                    help="fraction of hidden cells hidden on every slice (else centre only)")
    pt.add_argument("--mask-fill", choices=["zero", "noise"], default="zero")
    pt.add_argument("--visible-weight", type=float, default=1.0,
                    help="weight of L1 on visible brain pixels (keeps the identity there)")
    m = p.add_argument_group("model and recipe")
    m.add_argument("--out", type=Path, required=True, help="output folder (a --model-dir)")
    m.add_argument("--name", default=None,
                   help="registry name of the trained model (default: 'default', or "
                        "'pretrained' with --pretrain-unpaired)")
    m.add_argument("--version", default=None, help="model version (default: date-based)")
    m.add_argument("--init-from", metavar="NAME", help="fine-tune from this registry model")
    m.add_argument("--model-dir", type=Path, help="extra registry for --init-from")
    m.add_argument("--steps", type=int, default=4000)
    m.add_argument("--batch-size", type=int, default=16)
    m.add_argument("--patch", type=int, default=128)
    m.add_argument("--lr", type=float, default=None, help="default 1e-3 (2e-4 when fine-tuning)")
    m.add_argument("--n-slices", type=int, default=5)
    m.add_argument("--base", type=int, default=16)
    m.add_argument("--slab-depth", type=int, default=16)
    m.add_argument("--roi-size", type=int, default=208,
                   help="in-plane edge of simulated boxes (0: whole plane)")
    m.add_argument("--pool-size", type=int, default=32)
    m.add_argument("--refresh-every", type=int, default=4, help="steps between new slabs")
    m.add_argument("--val-slabs", type=int, default=24, help="held-out slabs (2 per pair)")
    m.add_argument("--max-minutes", type=float, default=0.0, help="stop after this wall time")
    m.add_argument("--no-uncertainty", action="store_true",
                   help="no uncertainty head (per-voxel expected absolute error)")
    m.add_argument("--unc-weight", type=float, default=0.1, help="weight of the Laplace NLL")
    m.add_argument("--head-only", action="store_true",
                   help="with --init-from: train only the uncertainty head, every other weight "
                        "frozen byte for byte (recalibrates the map on new data; the synthetic "
                        "images do not change)")
    m.add_argument("--cross-fit", metavar="NAME",
                   help="with --head-only: the head learns the errors of registry model NAME "
                        "(from --cross-fit-dir), a network never trained on the --anatomies "
                        "the patches come from, instead of the network's own errors on brains "
                        "it has fitted (use with --icbm-weight 0 when NAME saw ICBM152)")
    m.add_argument("--cross-fit-dir", type=Path, nargs="+", metavar="DIR",
                   help="registry folder of --cross-fit; or one folder per --anatomies brain, "
                        "in the same order (with --icbm-weight 0): each brain's patches then "
                        "take the errors of the NAME in its folder, a fold never trained on "
                        "that brain")
    m.add_argument("--level-weight", type=float, default=0.5,
                   help="weight of the tissue-level loss (relative error of 4 mm block means; "
                        "0: off, as for models before 2.2.0)")
    m.add_argument("--input-gain", nargs=2, type=float, default=[1.0, 1.0], metavar=("LO", "HI"),
                   help="random gain on each patch's source, log-uniform in [LO, HI], clipped "
                        "to [0, 1], so that the output does not follow the input's "
                        "normalisation (default 1 1: off; 0.7 1.1 cost a fine-tuned candidate "
                        "the quality target on 3 of 12 pairs: synth7t/models/TRAINING.md)")
    m.add_argument("--input-scaling", choices=INPUT_SCALINGS, default="none",
                   help="how the network's input is scaled (recorded in the weights): 'none' "
                        "takes the App's [0, 1] input (99.8th percentile = 1), 'brain-mean' "
                        "puts the whole brain's mean at a fixed level per pair, a scale the "
                        "noise does not raise but the brain's tissue proportions move (a "
                        "fine-tuned candidate missed the quality target on 3 of 12 pairs: "
                        "synth7t/models/TRAINING.md)")
    m.add_argument("--level-condition", nargs="*", type=float, default=[], metavar="BIN",
                   help="source field bins (e.g. 0.1) at which the network is also conditioned "
                        "on how far its source's whole-brain mean sits from the training "
                        "average (log ratio; recorded in the weights): the input keeps its "
                        "99.8th-percentile scale, which noise inflates, and the network learns "
                        "when it is inflated (default: none; the shipped 2.3.0 was trained with "
                        "0.1, and a network initialised from one that has it keeps its own; at "
                        "1.5-5 T the mean follows the tissue proportions more than the noise)")
    m.add_argument("--protocol-condition", action="store_true",
                   help="also condition the network on the source's protocol (TR, TE, TI, flip "
                        "angle as log ratios to physics.json's nominal values; recorded in the "
                        "weights): the App reads them from the BIDS sidecar. A network "
                        "initialised without it starts computing exactly what it did")
    m.add_argument("--protocol-dropout", type=float, default=0.3, metavar="P",
                   help="share of patches trained with the protocol 'not known', as inputs "
                        "without a sidecar arrive (default: 0.3)")
    m.add_argument("--ema-decay", type=float, default=0.999, help="0 disables the weight EMA")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    r.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    r.add_argument("--checkpoint-every", type=int, default=200, help="steps")
    r.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints")
    r.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    return p


def _registry_net(name: str | None, model_dir, data_desc: list[str], described: str, *,
                  flag: str = ""):
    """Registry network ``name`` (``described`` goes into ``data_desc``), None without a name,
    False on error (reported with ``flag``)."""
    if not name:
        return None
    from synth7t.registry import RegistryError
    from synth7t.train import load_registry_unet

    try:
        net = load_registry_unet(name, model_dir=model_dir)
    except RegistryError as exc:
        print(f"synth7t-train: {flag}{exc}", file=sys.stderr)
        return False
    data_desc.append(described)
    return net


def _init_net(args, data_desc: list[str]):
    """The ``--init-from`` network (recorded in ``data_desc``), None without it, False on error."""
    return _registry_net(args.init_from, args.model_dir, data_desc,
                         f"initialised from registry model {args.init_from!r}")


def _cross_fit_net(args, data_desc: list[str]):
    """The ``--cross-fit`` network (its errors teach the head), or ``{anatomy name: network}``
    with one ``--cross-fit-dir`` per ``--anatomies`` brain; None without it, False on error.
    :class:`synth7t.train.Trainer` checks that each reads the same input and conditions."""
    dirs = args.cross_fit_dir or [None]
    if len(dirs) == 1:
        return _registry_net(args.cross_fit, dirs[0], data_desc,
                             f"the head learns the errors of registry model {args.cross_fit!r} "
                             "(cross-fitting: a network never trained on these anatomies)",
                             flag="--cross-fit: ")
    nets = {}
    for npz, folder in zip(args.anatomies, dirs):
        with np.load(str(npz), allow_pickle=False) as z:
            name = str(z["name"])
        net = _registry_net(args.cross_fit, folder, [], "", flag=f"--cross-fit-dir {folder}: ")
        if net is False:
            return False
        nets[name] = net
    data_desc.append(f"the head learns, on each brain, the errors of registry model "
                     f"{args.cross_fit!r} from a fold never trained on it (cross-fitting: "
                     + "; ".join(f"{n} <- {d}" for n, d in zip(nets, dirs)) + ")")
    return nets


def _log(msg: str) -> None:
    print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from synth7t.fields import CONTRASTS, SUPPORTED_BINS
    from synth7t.train import (PatchSampler, SimulatorSource, TrainConfig, Trainer,
                               VolumePairSource, bids_pairs, mrixfields_pairs, validation_slabs)
    from synth7t.export import default_card, export_model
    from synth7t.sources import RandomAnatomies

    contrasts = tuple(args.contrasts or CONTRASTS)
    fields = tuple(args.fields or SUPPORTED_BINS)
    bad = [c for c in contrasts if c not in CONTRASTS]
    if bad:
        print(f"synth7t-train: unknown contrast(s) {bad}", file=sys.stderr)
        return 64
    bad = [f for f in args.level_condition if f not in SUPPORTED_BINS]
    if bad:
        print(f"synth7t-train: --level-condition {bad}: not a field bin {SUPPORTED_BINS}",
              file=sys.stderr)
        return 64
    if not 0.0 <= args.protocol_dropout <= 1.0:
        print(f"synth7t-train: --protocol-dropout {args.protocol_dropout}: not in [0, 1]",
              file=sys.stderr)
        return 64
    if args.head_only and (not args.init_from or args.no_uncertainty or args.pretrain_unpaired):
        print("synth7t-train: --head-only needs --init-from (a trained network) and its "
              "uncertainty head", file=sys.stderr)
        return 64
    if args.cross_fit and not args.head_only:
        print("synth7t-train: --cross-fit trains the uncertainty head alone: add --head-only",
              file=sys.stderr)
        return 64
    folds = args.cross_fit_dir or []
    if len(folds) > 1 and (len(folds) != len(args.anatomies) or args.icbm_weight != 0):
        print(f"synth7t-train: --cross-fit-dir: {len(folds)} folders need one --anatomies brain "
              f"each ({len(args.anatomies)} given) and --icbm-weight 0 (ICBM152's patches have "
              "no fold)", file=sys.stderr)
        return 64
    if args.icbm_weight < 0 or (args.icbm_weight == 0 and not args.anatomies):
        print(f"synth7t-train: --icbm-weight {args.icbm_weight}: needs >= 0, and > 0 without "
              "--anatomies", file=sys.stderr)
        return 64
    if args.pretrain_unpaired:
        if args.simulated or args.mrixfields or args.bids:
            print("synth7t-train: --pretrain-unpaired does not mix with paired data; pretrain "
                  "first, then fine-tune with --init-from pretrained --model-dir OUT",
                  file=sys.stderr)
            return 64
        return _pretrain(args, contrasts)
    args.name = args.name or "default"
    if not (args.simulated or args.mrixfields or args.bids):
        args.simulated = True

    sources = []
    data_desc: list[str] = []
    sim_source = None
    val_sim = None
    if args.simulated:
        from synth7t.anatomy import from_icbm152, load_anatomy
        from synth7t.simulate import Simulator

        icbm = from_icbm152()
        val_sim = Simulator(icbm)
        if args.no_randomise and not args.anatomies:
            sim_source = SimulatorSource(val_sim, depth=args.slab_depth,
                                         roi_size=args.roi_size or None, fields=fields,
                                         contrasts=contrasts)
            data_desc.append("simulated pairs from the ICBM152 2009 anatomy (synth7t.simulate; "
                             "random fields, contrasts, protocols within the physics.json "
                             "ranges, random deformations); Colin27/BrainWeb never used")
        else:
            anats = [icbm] + [load_anatomy(a) for a in args.anatomies]
            randomiser = RandomAnatomies(
                anats, weights=[args.icbm_weight] + [1.0] * len(args.anatomies),
                label_perturbation=0.0 if args.no_randomise else 0.5,
                texture_std=0.0 if args.no_randomise else 0.04, jitter=not args.no_randomise,
                sharpness=(1.0, 1.0) if args.no_randomise else tuple(args.pv_sharpness),
                csf_change=(0.0, 0.0) if args.no_randomise else tuple(args.csf_change))
            sim_source = SimulatorSource(depth=args.slab_depth, roi_size=args.roi_size or None,
                                         fields=fields, contrasts=contrasts,
                                         extent=SimulatorSource(val_sim, depth=args.slab_depth).extent,
                                         randomiser=randomiser)
            data_desc.append(
                "simulated pairs (synth7t.simulate) from " + ", ".join(randomiser.names)
                + "; every slab a new brain: random smooth deformation, GM/WM label "
                "perturbation, " + _pv_text(randomiser) + "random texture, per-tissue PD/T1/T2 "
                "jitter, protocol/SNR/voxel/bias ranges widened as physics.json "
                "training_widening says; Colin27/BrainWeb never used")
        sources.append((sim_source, 1.0))
    real_pairs = []
    if args.mrixfields:
        pairs = mrixfields_pairs(args.mrixfields, splits=args.mrixfields_split,
                                 contrasts=contrasts, fields=fields)
        if not pairs:
            print(f"synth7t-train: {args.mrixfields}: no paired P_ volumes with a 7T partner",
                  file=sys.stderr)
            return 66
        real_pairs += pairs
        data_desc.append(f"MRIxFields paired volumes ({len(pairs)} pairs, splits "
                         f"{', '.join(args.mrixfields_split)})")
    if args.bids:
        work = args.work_dir or (args.out / "work")
        pairs = bids_pairs(args.bids, work, contrasts=contrasts,
                           to_reference=args.bids_to_reference, threads=args.threads,
                           seed=args.seed)
        if not pairs:
            print(f"synth7t-train: {args.bids}: no participant has both a 7T and a lower-field "
                  "session of the same contrast", file=sys.stderr)
            return 66
        real_pairs += pairs
        data_desc.append(f"BIDS sessions registered rigidly to the 7T session ({len(pairs)} pairs)")
    if real_pairs:
        sources.append((VolumePairSource(real_pairs, depth=args.slab_depth), 1.0))

    init_net = _init_net(args, data_desc)
    if init_net is False:
        return 65
    if args.head_only:
        data_desc.append("only the uncertainty head trained (every other weight frozen)")
    error_net = _cross_fit_net(args, data_desc)
    if error_net is False:
        return 65

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, patch=args.patch,
                      lr=args.lr or (2e-4 if init_net is not None else 1e-3), seed=args.seed,
                      n_slices=init_net.config.n_slices if init_net else args.n_slices,
                      base=init_net.config.base if init_net else args.base,
                      pool_size=args.pool_size, refresh_every=args.refresh_every,
                      slab_depth=args.slab_depth, roi_size=args.roi_size,
                      checkpoint_every=args.checkpoint_every,
                      val_slabs=args.val_slabs, threads=args.threads, device=args.device,
                      max_minutes=args.max_minutes, data=data_desc,
                      uncertainty=not args.no_uncertainty, unc_weight=args.unc_weight,
                      level_weight=args.level_weight,
                      ema_decay=args.ema_decay, input_gain=tuple(args.input_gain),
                      input_scaling=args.input_scaling,
                      level_condition=tuple(args.level_condition),
                      protocol_condition=args.protocol_condition,
                      protocol_dropout=args.protocol_dropout, head_only=args.head_only,
                      cross_fit=args.cross_fit or "",
                      warmup=20 if init_net is not None else 100)

    # Held-out set: simulated with seeds offset far from training seeds when the simulator is
    # in use, else slabs of the given data (then *not* held out, and the card says so).
    val_note = "held-out simulated slabs (seed offset 10^9)"
    if sim_source is not None:
        val_src = SimulatorSource(val_sim, depth=args.slab_depth,
                                  roi_size=args.roi_size or None, fields=fields,
                                  contrasts=contrasts, seed_offset=10 ** 9,
                                  extent=sim_source.extent)
    else:
        val_src = VolumePairSource(real_pairs, depth=args.slab_depth)
        val_note = "slabs of the training pairs (no held-out real data)"
    val = validation_slabs(val_src, args.val_slabs, seed=args.seed + 12345) if args.val_slabs else []

    def sampler_factory(rng: np.random.Generator) -> PatchSampler:
        return PatchSampler(sources, rng, n_slices=cfg.n_slices, patch=cfg.patch,
                            pool_size=cfg.pool_size, refresh_every=cfg.refresh_every, log=_log,
                            input_gain=cfg.input_gain,
                            input_levels=trainer.net.config.input_levels,
                            level_condition=trainer.net.config.level_condition,
                            protocol_condition=trainer.net.config.protocol_condition,
                            protocol_dropout=cfg.protocol_dropout)

    try:
        trainer = Trainer(cfg, sampler_factory, args.out, val=val, init_net=init_net,
                          error_net=error_net, log=_log)
    except ValueError as exc:  # e.g. a --cross-fit network that reads other inputs
        what = f"--cross-fit {args.cross_fit}: " if args.cross_fit else ""
        print(f"synth7t-train: {what}{exc}", file=sys.stderr)
        return 65
    if args.resume:
        trainer.resume()
    _log(f"training {cfg.steps} steps, batch {cfg.batch_size}x{cfg.patch}^2, threads {cfg.threads}, "
         f"data: {'; '.join(data_desc)}")
    trainer.run(progress=not args.no_progress)

    best = args.out / "checkpoints" / "best.safetensors"
    weights = best if best.is_file() else args.out / "checkpoints" / "last.safetensors"
    card = default_card(trainer, data=data_desc, notes=[f"validation: {val_note}"])
    version = args.version or time.strftime("%Y.%m.%d")
    export_model(weights, args.out, name=args.name, version=version,
                 pairs=[(c, f) for c in contrasts for f in fields], card=card)
    _log(f"exported {args.out / 'model.safetensors'} ({weights.name}); registry "
         f"{args.out / 'registry.json'}")
    print(json.dumps({"steps": trainer.step, "wall_seconds": round(trainer.wall, 1),
                      "best": (trainer.best or {}).get("metrics", {}).get("mean", {})}))
    return 0


def _pretrain(args: argparse.Namespace, contrasts: tuple[str, ...]) -> int:
    """``--pretrain-unpaired``: masked-image modelling on unpaired images (synth7t.pretrain)."""
    from collections import Counter

    from synth7t.export import default_card, export_model
    from synth7t.fields import SUPPORTED_BINS, bin_label
    from synth7t.pretrain import (PretrainConfig, PretrainTrainer, UnpairedSource,
                                  masked_sampler, pretrain_card, split_volumes,
                                  validation_batches)
    from synth7t.sources import unpaired_volumes

    name = args.name or "pretrained"
    vols = unpaired_volumes(args.pretrain_unpaired, contrasts=contrasts, fields=args.fields)
    if not vols:
        print(f"synth7t-train: {args.pretrain_unpaired}: no MRIxFields R_ volumes or BIDS "
              f"{'/'.join(contrasts)} images found", file=sys.stderr)
        return 66
    train_vols, held = split_volumes(vols)
    counts = Counter(f"{v.contrast}@{'unknown field' if v.field_bin is None else bin_label(v.field_bin)}"
                     for v in vols)
    data_desc = [f"self-supervised masked-image modelling on {len(train_vols)} unpaired images "
                 f"under {args.pretrain_unpaired} (MRIxFields R_ volumes / BIDS images; "
                 + ", ".join(f"{k}: {n}" for k, n in sorted(counts.items())) + ")"]
    val_note = (f"validation: masked reconstruction loss on {len(held)} held-out images "
                "(every 20th in path order)" if held else
                "validation: masked reconstruction loss on fixed batches of the training images "
                "(fewer than 20 images: none held out)")
    init_net = _init_net(args, data_desc)
    if init_net is False:
        return 65
    cfg = PretrainConfig(
        steps=args.steps, batch_size=args.batch_size, patch=args.patch,
        lr=args.lr or (2e-4 if init_net is not None else 1e-3), seed=args.seed,
        n_slices=init_net.config.n_slices if init_net else args.n_slices,
        base=init_net.config.base if init_net else args.base,
        pool_size=args.pool_size, refresh_every=args.refresh_every,
        slab_depth=args.slab_depth, roi_size=args.roi_size,
        checkpoint_every=args.checkpoint_every, val_slabs=0, threads=args.threads,
        device=args.device, max_minutes=args.max_minutes, data=data_desc,
        uncertainty=not args.no_uncertainty, unc_weight=args.unc_weight,
        ema_decay=args.ema_decay, warmup=20 if init_net is not None else 100,
        mask_ratio=args.mask_ratio, mask_patch=args.mask_patch,
        tube_fraction=args.tube_fraction, fill=args.mask_fill,
        visible_weight=args.visible_weight,
        val_batches=0 if not args.val_slabs else max(1, round(args.val_slabs / 6)))
    val = validation_batches(held or train_vols, cfg, seed=args.seed + 12345)
    source = UnpairedSource(train_vols, depth=cfg.slab_depth, voxel_mm=cfg.voxel_mm)

    def sampler_factory(rng: np.random.Generator):
        return masked_sampler([(source, 1.0)], rng, cfg, log=_log)

    trainer = PretrainTrainer(cfg, sampler_factory, args.out, val_batches=val,
                              init_net=init_net, log=_log)
    if args.resume:
        trainer.resume()
    _log(f"pretraining {cfg.steps} steps, batch {cfg.batch_size}x{cfg.patch}^2, threads "
         f"{cfg.threads}, data: {'; '.join(data_desc)}")
    trainer.run(progress=not args.no_progress)

    best = args.out / "checkpoints" / "best.safetensors"
    weights = best if best.is_file() else args.out / "checkpoints" / "last.safetensors"
    card = default_card(trainer, data=data_desc, notes=[val_note])
    card.update(pretrain_card(trainer, data=data_desc, notes=[val_note]))
    fields = tuple(f for f in (args.fields or SUPPORTED_BINS) if f in SUPPORTED_BINS) \
        or SUPPORTED_BINS
    export_model(weights, args.out, name=name, version=args.version or time.strftime("%Y.%m.%d"),
                 pairs=[(c, f) for c in contrasts for f in fields], card=card)
    _log(f"exported {args.out / 'model.safetensors'} ({weights.name}) as {name!r}; fine-tune "
         f"with --init-from {name} --model-dir {args.out}")
    print(json.dumps({"steps": trainer.step, "wall_seconds": round(trainer.wall, 1),
                      "best": (trainer.best or {}).get("metrics", {}).get("mean", {})}))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
