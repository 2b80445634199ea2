"""Uncertainty-weighted local Wiener shrinkage of a synthetic image.

The uncertainty head predicts, per voxel, the expected absolute error ``b`` of the synthetic
image (a Laplace scale, so the error variance is ``2 b**2``). Where that variance is a large part
of the image's own local variance, the voxel's departure from its neighbourhood is mostly error,
and the minimum-mean-square-error linear estimate pulls it toward the local mean; where the
local variance is far above it (tissue edges, texture the network is sure of) the voxel is kept.
This is Lee's local-statistics filter (J.-S. Lee, IEEE Trans. Pattern Anal. Mach. Intell.
1980;2:165-168) with the noise variance read from the head instead of assumed constant. It
matters most for sources noisier than any the network was trained on, where the network passes
the noise through and its head says so (0.1 T T1w below the training SNR floor).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import ndimage as ndi

#: Gaussian width of the neighbourhood, in voxels of the 0.5 mm reference grid.
SIGMA = 1.0
#: Error variance per squared expected absolute error: ``2`` for a Laplace error.
LAPLACE_VARIANCE = 2.0


def local_moments(image: np.ndarray, mask: np.ndarray, sigma: float = SIGMA
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-weighted mean and variance of ``image`` around each voxel, over ``mask`` only
    (normalised convolution, so the brain's edge does not mix in the zeros outside it)."""
    m = mask.astype(np.float32)
    weight = ndi.gaussian_filter(m, sigma)
    np.maximum(weight, 1e-6, out=weight)
    work = np.multiply(image, m, out=m)  # the masked image; buffers are reused for memory
    mean = ndi.gaussian_filter(work, sigma)
    mean /= weight
    work *= image
    var = ndi.gaussian_filter(work, sigma)
    var /= weight
    np.multiply(mean, mean, out=work)
    var -= work
    np.maximum(var, 0.0, out=var)
    return mean, var


def _shrink_block(image: np.ndarray, b: np.ndarray, mask: np.ndarray, sigma: float
                  ) -> np.ndarray:
    mean, var = local_moments(image, mask, sigma)
    excess = np.square(b)
    excess *= LAPLACE_VARIANCE
    np.subtract(var, excess, out=excess)  # local variance the expected error does not explain
    np.maximum(excess, 0.0, out=excess)
    gain = np.zeros_like(var)
    np.divide(excess, var, out=gain, where=var > 0)
    out = image - mean
    out *= gain
    out += mean
    out[~mask] = 0.0
    return out


def wiener_shrink(image: np.ndarray, expected_abs_error: np.ndarray, mask: np.ndarray, *,
                  sigma: float = SIGMA, block: int = 32, threads: int | None = None
                  ) -> np.ndarray:
    """``image`` shrunk toward its local mean by the share of its local variance that the
    expected error explains; voxels outside ``mask`` are 0. Same shape, float32.

    Parameters
    ----------
    image : the synthetic image, [0, 1] intensity units.
    expected_abs_error : the uncertainty head's ``b`` for it, same units.
    mask : brain mask (bool).
    sigma : neighbourhood width in voxels.
    block, threads : the volume is done in blocks of ``block`` axial slices (with the filter's
        reach of neighbours on each side, so the result is the whole volume's to the bit) on
        ``threads`` threads (default 2): a few hundred MB at a time instead of several GB.
    """
    image = np.asarray(image, dtype=np.float32)
    b = np.asarray(expected_abs_error, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    halo = int(4.0 * sigma + 0.5)  # scipy's Gaussian reach (truncate=4)
    depth = image.shape[2]
    out = np.zeros_like(image)

    def run(z0: int) -> None:
        z1 = min(z0 + block, depth)
        lo, hi = max(z0 - halo, 0), min(z1 + halo, depth)
        # only the block's in-plane box of brain, widened by the filter's reach: outside it
        # the output is 0 and nothing inside it reads past the box (the same bits as the whole)
        occupied = mask[:, :, lo:hi].any(axis=2)
        if not occupied.any():
            return
        xs, ys = np.flatnonzero(occupied.any(axis=1)), np.flatnonzero(occupied.any(axis=0))
        x0, x1 = max(xs[0] - halo, 0), min(xs[-1] + 1 + halo, image.shape[0])
        y0, y1 = max(ys[0] - halo, 0), min(ys[-1] + 1 + halo, image.shape[1])
        box = (slice(x0, x1), slice(y0, y1), slice(lo, hi))
        part = _shrink_block(image[box], b[box], mask[box], sigma)
        out[x0:x1, y0:y1, z0:z1] = part[:, :, z0 - lo:z1 - lo]

    starts = range(0, depth, max(1, int(block)))
    with ThreadPoolExecutor(max_workers=max(1, int(threads or 2))) as pool:
        list(pool.map(run, starts))
    return out
