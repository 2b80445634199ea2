"""Uncertainty-weighted local Wiener shrinkage (synth7t.shrinkage) and its use in synthesis."""
from __future__ import annotations

import numpy as np
import torch

from synth7t.inference import UNetSynthesizer
from synth7t.networks import UNet25D, UNetConfig
from synth7t.shrinkage import LAPLACE_VARIANCE, local_moments, wiener_shrink


def _phantom(noise_sd: float, seed: int = 0):
    """Two tissues (0.3 | 0.8) split along x, inside a box mask, with Gaussian noise."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((40, 40, 12), np.float32)
    mask = np.zeros(truth.shape, bool)
    mask[4:36, 4:36, 2:10] = True
    truth[4:20] = 0.3
    truth[20:36] = 0.8
    truth *= mask
    noisy = (truth + rng.normal(0, noise_sd, truth.shape).astype(np.float32)) * mask
    return truth, noisy, mask


def test_no_expected_error_keeps_the_image():
    _, noisy, mask = _phantom(0.05)
    out = wiener_shrink(noisy, np.zeros_like(noisy), mask)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[mask], noisy[mask], atol=1e-5)
    assert (out[~mask] == 0).all()


def test_noise_the_map_explains_is_removed_and_the_edge_kept():
    sd = 0.1
    truth, noisy, mask = _phantom(sd)
    b = np.full(noisy.shape, sd / np.sqrt(LAPLACE_VARIANCE), np.float32) * mask
    out = wiener_shrink(noisy, b, mask)
    inner = np.zeros_like(mask)
    inner[6:18, 6:34, 3:9] = True  # one tissue, away from the edge and the mask's border
    assert out[inner].std() < 0.6 * noisy[inner].std()
    err_in = np.sqrt(np.mean((noisy - truth)[mask] ** 2))
    err_out = np.sqrt(np.mean((out - truth)[mask] ** 2))
    assert err_out < 0.8 * err_in
    # the 0.5 step between the tissues survives (means two voxels either side of it)
    step = out[21:23, 6:34, 3:9].mean() - out[17:19, 6:34, 3:9].mean()
    assert step > 0.4


def test_a_map_far_below_the_local_variation_changes_little():
    _, noisy, mask = _phantom(0.1)
    b = np.full(noisy.shape, 0.005, np.float32) * mask
    out = wiener_shrink(noisy, b, mask)
    assert np.abs(out - noisy)[mask].mean() < 0.01


def test_local_moments_ignore_voxels_outside_the_mask():
    img = np.zeros((20, 20, 6), np.float32)
    mask = np.zeros(img.shape, bool)
    mask[5:15, 5:15, 1:5] = True
    img[mask] = 0.7
    img[~mask] = 5.0  # would pull the edge's mean up if it leaked in
    mean, var = local_moments(img, mask)
    np.testing.assert_allclose(mean[mask], 0.7, atol=1e-5)
    assert var[mask].max() < 1e-6


def _net(shrinkage: bool) -> UNet25D:
    torch.manual_seed(0)
    net = UNet25D(UNetConfig(base=4, n_slices=3, uncertainty=True, shrinkage=shrinkage))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_synthesis_shrinks_as_the_config_says_and_returns_the_heads_map():
    _, vol, mask = _phantom(0.1, seed=2)
    vol = np.clip(vol, 0, 1)
    plain = UNetSynthesizer(_net(False), contrast="T1w", field_bin=0.1)
    shrunk = UNetSynthesizer(_net(True), contrast="T1w", field_bin=0.1)
    p0, u0 = plain.predict(vol, mask, return_uncertainty=True)
    p1, u1 = shrunk.predict(vol, mask, return_uncertainty=True)
    assert np.array_equal(u0, u1)  # the map is the head's either way
    expected = np.clip(wiener_shrink(p0, u0, mask), 0, 1)
    np.testing.assert_allclose(p1, expected, atol=1e-6)
    assert not np.array_equal(p0, p1)
    # without asking for the map the image is the same; the call can override the config
    assert np.array_equal(p1, shrunk.predict(vol, mask))
    assert np.array_equal(p0, shrunk.predict(vol, mask, shrinkage=False))
    assert np.array_equal(p1, plain.predict(vol, mask, shrinkage=True))
    assert (p1[~mask] == 0).all() and np.isfinite(p1).all()
    assert p1.tobytes() == shrunk.predict(vol, mask).tobytes()


def test_blocks_and_threads_give_the_whole_volumes_result():
    _, noisy, mask = _phantom(0.1, seed=4)
    b = np.abs(np.random.default_rng(5).normal(0, 0.05, noisy.shape)).astype(np.float32)
    whole = wiener_shrink(noisy, b, mask, block=noisy.shape[2], threads=1)
    for block, threads in ((1, 1), (3, 2), (5, 3)):
        assert np.array_equal(wiener_shrink(noisy, b, mask, block=block, threads=threads), whole)


def test_the_brains_box_gives_the_same_bits_as_the_whole_volume():
    # a small brain in a large field of view: blocks work on its in-plane box only
    _, noisy, mask = _phantom(0.1, seed=6)
    big = np.zeros((90, 80, 12), np.float32)
    bigmask = np.zeros(big.shape, bool)
    big[30:70, 20:60] = noisy
    bigmask[30:70, 20:60] = mask
    b = np.abs(np.random.default_rng(7).normal(0, 0.05, big.shape)).astype(np.float32)
    from synth7t.shrinkage import _shrink_block

    whole = _shrink_block(big, b, bigmask, 1.0)
    assert np.array_equal(wiener_shrink(big, b, bigmask, block=4, threads=2), whole)
