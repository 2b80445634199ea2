"""Feature-space novelty for the uncertainty map: where the input is unlike normal anatomy.

The uncertainty head (:mod:`synth7t.uncertainty`) learns the expected error on the kind of data
it was trained on; on input unlike anything in training (an unseen lesion, an artefact) it has
no reason to be right. This module fits, per (contrast, field) pair, ``k`` Gaussian clusters
(k-means, tied covariance) of the network's last decoder features on *normal* simulated anatomy
(the training anatomies without lesion blobs), and stores them in the network
(``UNetConfig.ood_clusters``). At inference the squared Mahalanobis distance to the nearest
cluster, relative to its ``quantile`` on the fitting data, scales the head's expected error up
where it exceeds 1 (:meth:`synth7t.networks.UNet25D.forward_with_uncertainty`), so the map stays
an expected absolute error on familiar input and rises on novel input (Lee et al., NeurIPS 2018,
Mahalanobis novelty detection on network features).

The same run stores, per pair, the 95th percentile of the finished map over normal slabs
(:func:`reference_levels`, ``UNetConfig.uncertainty_reference``), where the App's
out-of-distribution flag starts; ``--reference-only`` adds just that to a network whose
clusters are already fitted (its tensors unchanged).

    python -m synth7t.ood --weights best.safetensors --out best_ood.safetensors \\
        --anatomies sub-01.npz sub-02.npz [--slabs-per-pair 12 --clusters 4 --seed 0]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .anatomy import TRAINING_CSF_CHANGE, TRAINING_PV_SHARPNESS
from .fields import CONTRASTS, SUPPORTED_BINS
from .intensity import source_gain
from .networks import UNet25D, UNetConfig, condition_vector, pair_index
from .uncertainty import REFERENCE_QUANTILE

PAD = 16


def slab_features(net: UNet25D, slab, *, per_slab: int, rng: np.random.Generator) -> np.ndarray:
    """Decoder features (N, C) at up to ``per_slab`` random brain pixels of a slab."""
    from .inference import slice_stack

    n = net.config.n_slices
    src = slab.source * slab.mask
    if net.config.input_levels:
        src = src * np.float32(source_gain(net.config.input_levels, slab.contrast,
                                           slab.field_bin, slab.source_level, slab.source,
                                           slab.mask))
    X, Y, Z = src.shape
    px, py = (-X) % PAD, (-Y) % PAD
    cond = net.condition(slab.contrast, slab.field_bin, slab.source_level, slab.source,
                         slab.mask, slab.source_protocol)[None]
    feats = []
    with torch.inference_mode():
        for z in range(Z):
            if not slab.mask[:, :, z].any():
                continue
            x = np.pad(slice_stack(src, z, n), ((0, 0), (0, px), (0, py)))
            f = net.pooled_features(torch.from_numpy(x[None]), cond)[0]
            m = np.pad(slab.mask[:, :, z], ((0, px), (0, py))).astype(np.float32)
            sel = F.avg_pool2d(torch.from_numpy(m)[None, None], 2, ceil_mode=True)[0, 0] > 0.5
            feats.append(f.permute(1, 2, 0).numpy()[sel.numpy()])
    out = np.concatenate(feats) if feats else np.zeros((0, net.ood_dim), np.float32)
    if len(out) > per_slab:
        out = out[rng.choice(len(out), per_slab, replace=False)]
    return out


def fit(net: UNet25D, features: dict[tuple[str, float], np.ndarray], *, clusters: int = 4,
        quantile: float = 0.99, seed: int = 0) -> UNet25D:
    """A copy of ``net`` with novelty clusters fitted on ``features`` per (contrast, field)."""
    from sklearn.cluster import KMeans

    cfg = UNetConfig.from_json(net.config.to_json())
    cfg.ood_clusters = int(clusters)
    out = UNet25D(cfg)
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("ood_")}
    missing, unexpected = out.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("ood_") for k in missing), (missing, unexpected)
    for (contrast, field), f in features.items():
        f = np.asarray(f, np.float64)
        idx = int(pair_index(condition_vector(contrast, field)[None])[0])
        km = KMeans(n_clusters=clusters, n_init=3, random_state=seed).fit(f)
        centred = f - km.cluster_centers_[km.labels_]
        cov = centred.T @ centred / max(len(f) - clusters, 1)
        cov += np.eye(cov.shape[0]) * 1e-3 * np.trace(cov) / cov.shape[0]
        prec = np.linalg.inv(cov)
        diff = f[:, None, :] - km.cluster_centers_[None]
        d2 = np.einsum("nkc,cd,nkd->nk", diff, prec, diff).min(axis=1)
        with torch.no_grad():
            out.ood_mean[idx] = torch.as_tensor(km.cluster_centers_, dtype=torch.float32)
            out.ood_prec[idx] = torch.as_tensor(prec, dtype=torch.float32)
            out.ood_q[idx] = float(np.quantile(d2, quantile))
    return out.eval()


def reference_levels(net: UNet25D, slabs: dict[tuple[str, float], list], *,
                     quantile: float = REFERENCE_QUANTILE,
                     threads: int | None = None) -> dict[str, float]:
    """Per pair (``"T1w@0.1"``), the ``quantile`` of the uncertainty map over the brain voxels
    of normal slabs (:class:`synth7t.sources.Slab`), as the App computes the map (no flips).

    What a normal brain gives differs tenfold between pairs (the expected error of a 0.1 T
    source is mostly noise the network cannot undo): a fixed threshold would call every
    0.1 T scan out of distribution, or no 5 T one. Stored as ``UNetConfig.
    uncertainty_reference``.
    """
    from .inference import UNetSynthesizer
    from .intensity import level_key

    out = {}
    for (contrast, field), group in slabs.items():
        syn = UNetSynthesizer(net, contrast=contrast, field_bin=field)
        vals = []
        for slab in group:
            _, unc = syn.predict(slab.source, slab.mask, return_uncertainty=True,
                                 input_level=slab.source_level, threads=threads,
                                 protocol=slab.source_protocol)
            vals.append(unc[slab.mask])
        out[level_key(contrast, field)] = round(float(np.quantile(np.concatenate(vals),
                                                                  quantile)), 5)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m synth7t.ood", description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, required=True, help="safetensors of a UNet25D with "
                   "an uncertainty head")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--anatomies", nargs="*", type=Path, default=[],
                   help="extra normal anatomies (.npz) besides ICBM152")
    p.add_argument("--slabs-per-pair", type=int, default=12,
                   help="normal slabs rendered per pair (3 were too few brains: 39 %% of a "
                        "new brain's normal FLAIR 3 T was flagged as novel)")
    p.add_argument("--per-slab", type=int, default=20000, help="feature samples per slab")
    p.add_argument("--clusters", type=int, default=4)
    p.add_argument("--quantile", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reference-slabs", type=int, default=12,
                   help="normal slabs per pair for the map's reference level (reference_levels)")
    p.add_argument("--reference-only", action="store_true",
                   help="keep the network's fitted clusters; only add the reference levels")
    p.add_argument("--pv-sharpness", nargs=2, type=float, default=list(TRAINING_PV_SHARPNESS),
                   metavar=("LO", "HI"), help="partial-volume sharpening of the normal brains, "
                   "as synth7t-train's (models up to 2.4.0 were fitted with 1 1: off)")
    p.add_argument("--csf-change", nargs=2, type=float, default=list(TRAINING_CSF_CHANGE),
                   metavar=("LO", "HI"), help="CSF change of the normal brains, as "
                   "synth7t-train's (models up to 2.4.0: 0 0)")
    args = p.parse_args(argv)

    from safetensors import safe_open
    from safetensors.torch import load_file

    from .anatomy import from_icbm152, load_anatomy
    from .inference import save_unet
    from .simulate import Simulator
    from .sources import RandomAnatomies, SimulatorSource

    torch.set_num_threads(args.threads)
    with safe_open(str(args.weights), framework="pt") as fh:
        meta_in = fh.metadata() or {}
    cfg = UNetConfig.from_json(meta_in["config"])
    net = UNet25D(cfg)
    state = load_file(str(args.weights))
    if args.reference_only:
        net.load_state_dict(state, strict=True)
    else:
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith("ood_")},
                            strict=False)
    net.eval()
    icbm = from_icbm152()
    anats = [icbm] + [load_anatomy(a) for a in args.anatomies]
    # normal anatomy: the training randomisation without lesion blobs
    randomiser = RandomAnatomies(anats, lesion_probability=0.0,
                                 sharpness=tuple(args.pv_sharpness),
                                 csf_change=tuple(args.csf_change))
    src = SimulatorSource(depth=12, roi_size=208, randomiser=randomiser,
                          extent=SimulatorSource(Simulator(icbm), depth=12).extent,
                          seed_offset=2 * 10 ** 9)
    t0 = time.perf_counter()
    if args.reference_only:
        out, meta = net, {k: v for k, v in meta_in.items() if k == "ood"}
    else:
        rng = np.random.default_rng(args.seed)
        feats: dict[tuple[str, float], np.ndarray] = {}
        for c in CONTRASTS:
            for fb in SUPPORTED_BINS:
                parts = []
                while len(parts) < args.slabs_per_pair:
                    for slab in src.make_pair(rng, c, fb):
                        parts.append(slab_features(net, slab, per_slab=args.per_slab, rng=rng))
                feats[(c, fb)] = np.concatenate(parts)
                print(f"{c}@{fb:g}T: {len(feats[(c, fb)])} feature vectors "
                      f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        out = fit(net, feats, clusters=args.clusters, quantile=args.quantile, seed=args.seed)
        meta = {"ood": f"k={args.clusters} tied-covariance clusters per pair, quantile "
                       f"{args.quantile}, {args.slabs_per_pair} normal slabs per pair, seed "
                       f"{args.seed}"}
    # the finished map on new normal slabs (their own seed stream, not the clusters' slabs)
    ref_rng = np.random.default_rng([args.seed, 1])
    refs: dict[str, float] = {}
    for c in CONTRASTS:
        for fb in SUPPORTED_BINS:
            group = []
            while len(group) < args.reference_slabs:
                group.extend(src.make_pair(ref_rng, c, fb))
            refs.update(reference_levels(out, {(c, fb): group[:args.reference_slabs]},
                                         threads=args.threads))
    out.config.uncertainty_reference = refs
    print(f"reference levels ({REFERENCE_QUANTILE} quantile of the map over normal brains): "
          f"{out.config.uncertainty_reference} ({time.perf_counter() - t0:.0f} s)",
          file=sys.stderr, flush=True)
    meta["uncertainty_reference"] = (f"{REFERENCE_QUANTILE} quantile of the map over "
                                     f"{args.reference_slabs} normal slabs per pair, seed "
                                     f"[{args.seed}, 1]")
    sha = save_unet(out, args.out, extra_metadata=meta)
    print(f"{args.out}: sha256 {sha}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
