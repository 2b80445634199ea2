"""Per-voxel uncertainty of a synthetic 7T image: what it means, how it is summarised and checked.

The estimate itself is computed during inference (:meth:`synth7t.inference.UNetSynthesizer.
predict` with ``return_uncertainty=True``) by networks trained with an uncertainty head:

* the head predicts, per voxel, the scale ``b`` of a Laplace distribution of the true 7T
  intensity around the prediction; trained with the Laplace negative log-likelihood on the
  simulator's paired data (:func:`synth7t.train.laplace_nll`), ``b`` is the **expected absolute
  error** (aleatoric part: noise, resolution loss, partial volume);
* with test-time flips, ``b`` is averaged over the original and the left-right flipped pass and
  half of their absolute disagreement is added (a cheap epistemic part: a network sure of its
  answer gives the same answer for the mirrored anatomy).

* where the input was clipped at 1 by its normalisation, the clipped-off amount is added
  (:func:`add_saturation`): intensity the network never saw.

Units: intensity units of the synthetic image, which is normalised to [0, 1] (so 0.05 = 5 % of
the image's intensity range). The map is finite, >= 0 and exactly 0 outside the brain mask.

The summary (:func:`summarise`) goes into the synthetic image's sidecar; the report warns when
more than :data:`OOD_SHARE` of the brain lies above the pair's out-of-distribution threshold:
the larger of :data:`THRESHOLD` and the level that only 5 % of a normal brain's map exceeds for
that pair (``UNetConfig.uncertainty_reference``, :func:`synth7t.ood.reference_levels`). A
fixed threshold alone flagged every normal 0.1 T T1w and FLAIR (their expected error is mostly
the source's noise: 52-66 % of a held-out brain above 0.05) and no 5 T input.
This module has no Nipype and no torch dependency.
"""
from __future__ import annotations

import numpy as np

#: A voxel is "uncertain" when its expected absolute error exceeds this ([0, 1] units).
THRESHOLD = 0.05
#: Quantile of a pair's map over normal brains that its out-of-distribution threshold starts
#: from (``UNetConfig.uncertainty_reference``, :func:`synth7t.ood.reference_levels`).
REFERENCE_QUANTILE = 0.95
#: Share of the brain above the out-of-distribution threshold (1 - :data:`REFERENCE_QUANTILE`
#: in a normal brain when the model has a reference level) above which the input is flagged as
#: out of distribution.
OOD_SHARE = 0.25
UNITS = "expected absolute error, intensity units of the [0, 1]-normalised synthetic image"
METHOD = ("Laplace scale b from the network's uncertainty head (trained with the Laplace "
          "negative log-likelihood on simulated pairs), averaged over the left-right test-time "
          "flips, plus half the flips' absolute disagreement")
METHOD_NO_TTA = ("Laplace scale b from the network's uncertainty head (trained with the Laplace "
                 "negative log-likelihood on simulated pairs)")
NOVELTY = ("; scaled up where the network's features are unlike normal anatomy (squared "
           "Mahalanobis distance to fitted clusters above their 99 % quantile; synth7t.ood)")
SATURATION = ("; plus the input's intensity above its normalisation's upper percentile, which "
              "the clip at 1 hides from the network (synth7t.uncertainty.add_saturation)")


def add_saturation(uncertainty: np.ndarray, excess: np.ndarray | None,
                   mask: np.ndarray | None = None) -> np.ndarray:
    """Add to the map what the input lost to the clip at 1 (in place; returns the map).

    Every model input is scaled so that the brain's 99.8th percentile is 1 and clipped there
    (:func:`synth7t.intensity.normalise`, in training as in the App), so a voxel brighter than
    that, e.g. a FLAIR lesion at twice the white matter, reaches the network as a plateau at 1
    that it treats as predictable. Its true intensity is information the network never had:
    ``excess`` (``normalise(..., excess=True)``, the clipped-off amount in the same [0, 1]
    units) is added one for one to the expected absolute error. By construction it touches
    at most the 0.2 % brightest voxels of a normal brain, and by little.
    """
    if excess is None:
        return uncertainty
    add = np.asarray(excess, dtype=np.float32)
    if mask is not None:
        add = np.where(np.asarray(mask, bool), add, np.float32(0.0))
    uncertainty += add
    return uncertainty


def ood_threshold(reference: float | None, threshold: float = THRESHOLD) -> float:
    """The out-of-distribution threshold of a pair whose normal brains' map has 95th percentile
    ``reference`` (``None``: unknown, the fixed ``threshold`` alone)."""
    return float(max(threshold, reference or 0.0))


def summarise(uncertainty: np.ndarray, mask: np.ndarray, *, threshold: float = THRESHOLD,
              reference: float | None = None) -> dict:
    """Sidecar summary of an uncertainty map inside the brain mask.

    Parameters
    ----------
    reference
        The pair's ``UNetConfig.uncertainty_reference`` (95th percentile of the map over
        normal brains), or ``None``.

    Returns
    -------
    dict
        ``UncertaintyMeanBrain`` (mean expected absolute error), ``UncertaintyP95Brain``,
        ``UncertainShareBrain`` (fraction of brain voxels above ``threshold``),
        ``UncertaintyThreshold``, ``UncertaintyOODThreshold`` (:func:`ood_threshold`),
        ``UncertainShareAboveOODThreshold`` and ``UncertaintyOutOfDistribution`` (that share
        > :data:`OOD_SHARE`).
    """
    sel = np.asarray(mask, bool)
    # the brain's voxels first, then float64: not a float64 copy of the whole 0.5 mm grid
    vals = np.asarray(uncertainty)[sel].astype(np.float64)
    limit = ood_threshold(reference, threshold)
    if vals.size == 0:
        return {"UncertaintyMeanBrain": 0.0, "UncertaintyP95Brain": 0.0,
                "UncertainShareBrain": 0.0, "UncertaintyThreshold": threshold,
                "UncertaintyOODThreshold": round(limit, 6),
                "UncertainShareAboveOODThreshold": 0.0,
                "UncertaintyOutOfDistribution": False}
    share = float(np.mean(vals > threshold))
    share_ood = float(np.mean(vals > limit))
    return {"UncertaintyMeanBrain": round(float(vals.mean()), 6),
            "UncertaintyP95Brain": round(float(np.percentile(vals, 95)), 6),
            "UncertainShareBrain": round(share, 6),
            "UncertaintyThreshold": threshold,
            "UncertaintyOODThreshold": round(limit, 6),
            "UncertainShareAboveOODThreshold": round(share_ood, 6),
            "UncertaintyOutOfDistribution": bool(share_ood > OOD_SHARE)}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties), without SciPy's overhead."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else 0.0


def decile_calibration(uncertainty: np.ndarray, abs_error: np.ndarray,
                       n_bins: int = 10, *, signed_error: np.ndarray | None = None) -> list[dict]:
    """Mean predicted uncertainty and mean absolute error per quantile bin of the uncertainty.

    A calibrated, useful map gives a mean absolute error that rises with the bin (and, ideally,
    close to the predicted value, since the map is an expected absolute error). With
    ``signed_error`` (prediction - target) each bin also gets its mean signed error: a bin whose
    absolute error is mostly one offset holds a level error shared by its voxels (see
    :func:`offset_share`), which no per-voxel ordering within it can rank.
    """
    u = np.asarray(uncertainty, np.float64).ravel()
    e = np.asarray(abs_error, np.float64).ravel()
    s = None if signed_error is None else np.asarray(signed_error, np.float64).ravel()
    order = np.argsort(u, kind="stable")
    out = []
    for i, idx in enumerate(np.array_split(order, n_bins)):
        if idx.size == 0:
            continue
        row = {"bin": i + 1, "mean_uncertainty": float(u[idx].mean()),
               "mean_abs_error": float(e[idx].mean()), "voxels": int(idx.size)}
        if s is not None:
            row["mean_signed_error"] = float(s[idx].mean())
        out.append(row)
    return out


def offset_share(rows: list[dict]) -> float:
    """Share of the mean absolute error that is each calibration bin's mean signed error
    (:func:`decile_calibration` with ``signed_error``): 0 when the errors within every bin
    cancel (noise-like), 1 when every voxel of a bin is off by the same amount (a level error)."""
    n = np.array([r["voxels"] for r in rows], np.float64)
    mae = float((n * [r["mean_abs_error"] for r in rows]).sum())
    off = float((n * np.abs([r["mean_signed_error"] for r in rows])).sum())
    return off / mae if mae > 0 else 0.0


def is_monotonic(rows: list[dict], key: str = "mean_abs_error") -> bool:
    """Whether ``key`` is non-decreasing over the calibration bins."""
    vals = [r[key] for r in rows]
    return all(b >= a for a, b in zip(vals, vals[1:]))


def largest_dip(rows: list[dict], key: str = "mean_abs_error") -> tuple[float, int]:
    """The largest fall of ``key`` from one calibration bin to the next, and the bin (1-based)
    it falls into; ``(0.0, 0)`` when non-decreasing. Says how far a failed
    :func:`is_monotonic` is from holding (a dip within the bins' sampling noise or a trend)."""
    drops = [(a[key] - b[key], b["bin"]) for a, b in zip(rows, rows[1:])]
    drop, where = max(drops, default=(0.0, 0))
    return (float(drop), int(where)) if drop > 0 else (0.0, 0)


#: Lesion-to-white-matter intensity of :func:`insert_lesion` (see there).
FACTORS = {"T1w": 0.4, "T2w": 2.5, "FLAIR": 2.0}


def insert_lesion(source: np.ndarray, region: np.ndarray, *, centre: tuple[int, int, int],
                  radius: float, contrast: str, edge: float = 1.5,
                  brain_voxels: int | None = None, excess: bool = False) -> tuple:
    """Insert a synthetic lesion (a soft-edged ball) into a source image, for validation.

    The lesion mimics a chronic white-matter lesion (:data:`FACTORS` x the white matter): a T1
    "black hole", hyperintense on T2w and FLAIR, with a texture of its own, and the image is
    normalised again afterwards as the App would normalise the whole brain it belongs to.

    Parameters
    ----------
    source
        Image in [0, 1].
    region
        Where the lesion may lie (e.g. the white matter); the ball is cut to it.
    centre, radius
        Ball centre (voxels) and radius (voxels).
    brain_voxels
        Brain voxels of the whole volume ``source`` is a part of (e.g. a slab of a 0.5 mm brain:
        about 1.2 L / 0.125 mL = 9.6 million). The App normalises the whole brain (its upper
        percentile -> 1), where a small lesion barely moves the percentile and a bright one is
        clipped at 1; renormalising a slab alone would let the lesion set the percentile and
        darken all normal tissue, an input no App run sees. With ``brain_voxels`` the lesion
        enters the percentile with its share of the whole brain (the rest of the brain taken to
        look like the slab's normal tissue). Default: ``source`` is the whole brain.

    excess
        Also return what the clip at 1 removed (as ``normalise(..., excess=True)``).

    Returns
    -------
    (image, lesion_mask) or (image, lesion_mask, excess)
    """
    from synth7t.intensity import UPPER_PERCENTILE, normalise

    factor = {"T1w": FACTORS["T1w"], "T2w": FACTORS["T2w"], "FLAIR": FACTORS["FLAIR"]}[contrast]
    idx = np.indices(source.shape, dtype=np.float32)
    dist = np.sqrt(sum((idx[i] - centre[i]) ** 2 for i in range(3)))
    weight = np.clip((radius - dist) / edge + 0.5, 0.0, 1.0) * (np.asarray(region) > 0)
    rng = np.random.default_rng(0)
    texture = 1.0 + 0.08 * rng.standard_normal(source.shape).astype(np.float32)
    src = np.asarray(source, dtype=np.float32)
    scaled = (src * (1.0 + weight * (factor * texture - 1.0))).astype(np.float32)
    brain = src > 0
    if brain_voxels is None or not brain.any():
        out, over = normalise(scaled, brain, excess=True)
        return (out, weight > 0.5, over) if excess else (out, weight > 0.5)
    # the rest of the whole brain, as many copies of the slab's un-lesioned tissue
    copies = max(int(round(brain_voxels / brain.sum())) - 1, 0)
    hi = float(np.percentile(np.concatenate([scaled[brain]] + [src[brain]] * copies),
                             UPPER_PERCENTILE)) or 1.0
    out = np.where(brain, np.clip(scaled / hi, 0.0, 1.0), 0.0).astype(np.float32)
    if excess:
        over = np.where(brain, np.maximum(scaled / hi - 1.0, 0.0), 0.0).astype(np.float32)
        return out, weight > 0.5, over
    return out, weight > 0.5
