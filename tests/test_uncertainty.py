"""Per-voxel uncertainty: the estimate, its summary, the graph and the shipped model's behaviour."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from synth7t import uncertainty as U
from synth7t.fields import route_field
from synth7t.inference import UNetSynthesizer, load_synthesizer
from synth7t.networks import UNet25D, UNetConfig
from synth7t.registry import Registry

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BRAINWEB = DATA / "brainweb_crisp_labels.nii.gz"

#: in-plane 3x3 neighbourhood: slabs are only a few slices deep
INPLANE = np.ones((3, 3, 1), bool)


def _net(uncertainty=True, seed=0) -> UNet25D:
    torch.manual_seed(seed)
    net = UNet25D(UNetConfig(base=4, n_slices=3, uncertainty=uncertainty))
    # a non-trivial head so that the map varies with the input
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _volume(shape=(40, 48, 12)):
    rng = np.random.default_rng(3)
    vol = np.clip(rng.normal(0.5, 0.15, shape), 0, 1).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[6:34, 8:40, 2:10] = True
    return vol * mask, mask


@pytest.mark.parametrize("tta", [False, True])
def test_map_is_finite_nonnegative_zero_outside_and_deterministic(tta):
    vol, mask = _volume()
    syn = UNetSynthesizer(_net(), contrast="T1w", field_bin=1.5)
    pred, unc = syn.predict(vol, mask, tta=tta, return_uncertainty=True)
    pred2, unc2 = syn.predict(vol, mask, tta=tta, return_uncertainty=True)
    assert unc.shape == vol.shape and unc.dtype == np.float32
    assert np.isfinite(unc).all() and (unc >= 0).all()
    assert (unc[~mask] == 0).all() and (unc[mask] > 0).all()
    assert pred.tobytes() == pred2.tobytes() and unc.tobytes() == unc2.tobytes()
    # the image itself is the same with or without the uncertainty output
    assert np.array_equal(pred, syn.predict(vol, mask, tta=tta))


def test_flip_disagreement_adds_to_the_head():
    vol, mask = _volume()
    syn = UNetSynthesizer(_net(), contrast="FLAIR", field_bin=3.0)
    _, plain = syn.predict(vol, mask, tta=False, return_uncertainty=True)
    _, flipped = syn.predict(vol[::-1].copy(), mask[::-1].copy(), tta=False,
                             return_uncertainty=True)
    _, both = syn.predict(vol, mask, tta=True, return_uncertainty=True)
    # with flips: mean of the two heads plus half the disagreement, so never below their mean
    assert (both[mask] >= 0.5 * (plain + flipped[::-1])[mask] - 1e-6).all()


def test_novelty_detector_scales_the_head_beyond_its_quantile():
    """Fitted clusters leave b alone below the fitted quantile and scale it by d2/q beyond."""
    import torch

    from synth7t.networks import condition_vector, pair_index
    from synth7t.ood import fit, slab_features
    from synth7t.sources import Slab

    vol, mask = _volume()
    net = _net().eval()
    feats = slab_features(net, Slab(vol, vol, mask, "T1w", 1.5), per_slab=4000,
                          rng=np.random.default_rng(0))
    assert feats.shape[1] == net.ood_dim
    fitted = fit(net, {("T1w", 1.5): feats}, clusters=2, quantile=0.99)
    idx = int(pair_index(condition_vector("T1w", 1.5)[None])[0])
    q = float(fitted.ood_q[idx])
    plain = UNetSynthesizer(net, contrast="T1w", field_bin=1.5)
    _, u0 = plain.predict(vol, mask, return_uncertainty=True)
    _, u1 = UNetSynthesizer(fitted, contrast="T1w", field_bin=1.5).predict(
        vol, mask, return_uncertainty=True)
    assert (u1 >= u0 - 1e-7).all()  # never lowers the head's estimate
    assert np.mean(u1[mask] > u0[mask] * 1.01) < 0.1  # the fitting data: mostly unchanged
    with torch.no_grad():
        fitted.ood_q[idx] = q / 100.0  # now (almost) everything is "novel"
    _, u2 = UNetSynthesizer(fitted, contrast="T1w", field_bin=1.5).predict(
        vol, mask, return_uncertainty=True)
    assert np.median(u2[mask] / u0[mask]) > 5


def test_reference_level_is_the_maps_quantile_over_normal_slabs_and_sets_the_flag():
    """A pair's reference level is the 95th percentile of its map over normal slabs; the
    out-of-distribution flag counts the brain above it (or above the fixed threshold, if
    higher): a normal slab is not flagged, one whose map doubles everywhere is."""
    from synth7t.ood import reference_levels
    from synth7t.sources import Slab

    vol, mask = _volume()
    net = _net().eval()
    ref = reference_levels(net, {("T2w", 0.1): [Slab(vol, vol, mask, "T2w", 0.1)]})
    _, unc = UNetSynthesizer(net, contrast="T2w", field_bin=0.1).predict(
        vol, mask, return_uncertainty=True)
    assert set(ref) == {"T2w@0.1"}
    assert ref["T2w@0.1"] == pytest.approx(np.quantile(unc[mask], 0.95), abs=1e-5)
    for scale in (0.5, 20.0):  # the map well below and well above the fixed threshold
        u = unc * np.float32(scale * U.THRESHOLD / ref["T2w@0.1"])
        r = ref["T2w@0.1"] * scale * U.THRESHOLD / ref["T2w@0.1"]
        normal = U.summarise(u, mask, reference=r)
        assert normal["UncertaintyOODThreshold"] == pytest.approx(max(U.THRESHOLD, r), rel=1e-4)
        assert normal["UncertainShareAboveOODThreshold"] <= 0.05 + 1e-6
        assert not normal["UncertaintyOutOfDistribution"]
        assert U.summarise(2 * u, mask, reference=r)["UncertaintyOutOfDistribution"] is (
            r > U.THRESHOLD)
    # without a reference: the fixed threshold, as before
    plain = U.summarise(unc, mask)
    assert plain["UncertaintyOODThreshold"] == U.THRESHOLD
    assert plain["UncertainShareAboveOODThreshold"] == plain["UncertainShareBrain"]


def test_models_without_a_head_say_so():
    vol, mask = _volume()
    syn = UNetSynthesizer(_net(uncertainty=False), contrast="T1w", field_bin=1.5)
    assert not syn.has_uncertainty
    pred, unc = syn.predict(vol, mask, return_uncertainty=True)
    assert unc is None and pred.shape == vol.shape
    with pytest.raises(ValueError, match="no uncertainty head"):
        _net(uncertainty=False).forward_with_uncertainty(torch.zeros(1, 3, 16, 16),
                                                         torch.zeros(1, 7))


def test_summary_and_statistics():
    rng = np.random.default_rng(0)
    unc = rng.uniform(0, 0.1, (20, 20, 5)).astype(np.float32)
    mask = np.zeros(unc.shape, bool)
    mask[2:18, 2:18] = True
    s = U.summarise(unc, mask)
    assert s["UncertaintyMeanBrain"] == pytest.approx(unc[mask].mean(), rel=1e-5)
    assert s["UncertainShareBrain"] == pytest.approx((unc[mask] > U.THRESHOLD).mean(), rel=1e-5)
    assert s["UncertaintyOutOfDistribution"] is (s["UncertainShareBrain"] > U.OOD_SHARE)
    a, b = rng.normal(size=500), rng.normal(size=500)
    b = a + 0.5 * b
    assert U.spearman(a, b) == pytest.approx(stats.spearmanr(a, b)[0], abs=1e-9)
    err = np.abs(rng.normal(size=5000)) * np.linspace(0.1, 1, 5000)
    rows = U.decile_calibration(np.linspace(0.1, 1, 5000), err)
    assert len(rows) == 10 and sum(r["voxels"] for r in rows) == 5000
    assert not U.is_monotonic([{"mean_abs_error": 1.0}, {"mean_abs_error": 0.5}])
    dips = [{"bin": i + 1, "mean_abs_error": v} for i, v in enumerate((1.0, 2.0, 1.9, 3.0, 2.5))]
    assert U.largest_dip(dips) == (pytest.approx(0.5), 5)
    assert U.largest_dip(rows[:1]) == (0.0, 0)
    assert U.largest_dip([{"bin": i + 1, "mean_abs_error": i} for i in range(4)]) == (0.0, 0)


def test_offset_share_separates_a_level_error_from_noise():
    """A bin-wide offset counts in full, zero-mean noise hardly at all."""
    rng = np.random.default_rng(3)
    unc = rng.uniform(size=20000)
    noise = rng.normal(scale=0.01, size=unc.size)
    for signed, lo, hi in ((noise, 0.0, 0.05), (noise + 0.05, 0.95, 1.0)):
        rows = U.decile_calibration(unc, np.abs(signed), signed_error=signed)
        assert all("mean_signed_error" in r for r in rows)
        assert lo <= U.offset_share(rows) <= hi
    assert "mean_signed_error" not in U.decile_calibration(unc, np.abs(noise))[0]


def test_lesion_insertion_changes_only_the_ball():
    img = np.full((30, 30, 10), 0.6, np.float32)
    region = np.ones(img.shape, bool)
    out, lesion = U.insert_lesion(img, region, centre=(15, 15, 5), radius=4, contrast="FLAIR")
    far = np.ones(img.shape, bool)
    far[8:23, 8:23, :] = False
    # outside the ball only the App's renormalisation (one scale factor) changes the image
    ratio = out[far] / img[far]
    assert lesion.sum() > 100 and np.allclose(ratio, ratio[0], rtol=1e-5)
    assert out[lesion].mean() / out[far].mean() == pytest.approx(U.FACTORS["FLAIR"], rel=0.1)
    assert out.max() <= 1.0



def test_lesion_share_of_the_whole_brain_sets_the_percentile():
    """A bright lesion filling a slab's top percentiles darkens the slab when the slab alone is
    renormalised; counted with its share of the whole brain it is clipped at 1 instead, and
    normal tissue keeps its intensity (as in an App run on the whole brain)."""
    rng = np.random.default_rng(3)
    img = np.clip(0.8 + 0.05 * rng.standard_normal((40, 40, 8)), 0, 1).astype(np.float32)
    img /= np.percentile(img, 99.8)
    img = np.clip(img, 0, 1)
    region = np.ones(img.shape, bool)
    slab, lesion = U.insert_lesion(img, region, centre=(20, 20, 4), radius=5, contrast="FLAIR")
    whole, lesion2 = U.insert_lesion(img, region, centre=(20, 20, 4), radius=5, contrast="FLAIR",
                                     brain_voxels=img.size * 100)
    assert (lesion == lesion2).all() and lesion.sum() > 0.002 * img.size
    normal = ~np.pad(np.ones((14, 14, 8), bool), ((13, 13), (13, 13), (0, 0)))
    assert slab[normal].mean() < 0.8 * img[normal].mean()  # the slab artefact
    assert whole[normal].mean() == pytest.approx(img[normal].mean(), rel=0.03)
    assert np.median(whole[lesion]) == 1.0 and whole.max() <= 1.0

def test_normalise_keeps_what_the_clip_removed():
    from synth7t.intensity import normalise

    rng = np.random.default_rng(5)
    img = rng.uniform(10, 100, (30, 30, 6)).astype(np.float32)
    img[10:12, 10:12, 2] = 400.0  # 4 voxels (0.1 %), above the 99.8th percentile: clipped
    mask = np.zeros(img.shape, bool)
    mask[2:28, 2:28, :] = True
    out, excess = normalise(img, mask, excess=True)
    assert np.array_equal(out, normalise(img, mask))
    hi = np.percentile(img[mask], 99.8)
    np.testing.assert_allclose((out + excess)[mask], img[mask] / hi, rtol=1e-5)
    assert excess[10:12, 10:12, 2].min() > 2.0 and (excess[~mask] == 0).all()
    assert np.count_nonzero(excess[mask]) <= 0.003 * mask.sum() + 64


def test_saturation_adds_the_excess_inside_the_mask_only():
    unc = np.full((4, 4, 2), 0.01, np.float32)
    excess = np.zeros_like(unc)
    excess[1, 1, 0] = 0.3
    excess[3, 3, 1] = 0.5  # outside the mask below
    mask = np.ones(unc.shape, bool)
    mask[3, 3, 1] = False
    out = U.add_saturation(unc, excess, mask)
    assert out is unc and out[1, 1, 0] == pytest.approx(0.31) and out[3, 3, 1] == 0.01
    assert U.add_saturation(unc, None) is unc


def test_synthesis_node_adds_the_inputs_clip_excess(tmp_path):
    """PrepareSynthesisInput keeps what its clip removed; Synthesize adds it to the map."""
    import nibabel as nib

    from workflows.interfaces import PrepareSynthesisInput, Synthesize, load_excess

    rng = np.random.default_rng(0)
    data = np.zeros((40, 44, 24), np.float32)
    data[8:32, 8:36, 4:20] = rng.uniform(50, 100, (24, 28, 16))
    data[18:20, 20:22, 10:12] = 300.0  # a small bright "lesion" (0.07 %) above the percentile
    mask = (data > 0).astype(np.uint8)
    aff = np.diag([0.5, 0.5, 0.5, 1.0])
    nib.save(nib.Nifti1Image(data, aff), tmp_path / "in.nii.gz")
    nib.save(nib.Nifti1Image(mask, aff), tmp_path / "mask.nii.gz")
    prep = PrepareSynthesisInput(in_file=str(tmp_path / "in.nii.gz"),
                                 ref_mask=str(tmp_path / "mask.nii.gz"),
                                 storage_dtype="float32").run(cwd=str(tmp_path))
    excess = load_excess(prep.outputs.excess_file)
    assert excess[18:20, 20:22, 10:12].min() > 1.5 and excess.shape == data.shape
    maps = {}
    for with_excess in (False, True):
        node = Synthesize(in_file=prep.outputs.out_file, mask_file=str(tmp_path / "mask.nii.gz"),
                          contrast="FLAIR", field_bin=1.5, uncertainty=True,
                          storage_dtype="float32", omp_nthreads=1)
        if with_excess:
            node.inputs.excess_file = prep.outputs.excess_file
        (tmp_path / f"synth{with_excess}").mkdir()
        res = node.run(cwd=str(tmp_path / f"synth{with_excess}"))
        maps[with_excess] = nib.load(res.outputs.out_uncertainty).get_fdata()
        method = res.outputs.uncertainty_summary["UncertaintyMethod"]
        assert (U.SATURATION in method) is with_excess
    diff = maps[True] - maps[False]
    np.testing.assert_allclose(diff, np.minimum(maps[False] + excess, 1.0) - maps[False],
                               atol=1e-5)
    assert maps[True][18:20, 20:22, 10:12].min() > 1.0 - 1e-6  # capped at 1


# --------------------------------------------------------------------------- graph
def _images(contrasts, field=3.0):
    return {c: SimpleNamespace(path=Path(f"/data/bids/sub-01/anat/sub-01_{c}.nii.gz"),
                               relpath=f"sub-01/anat/sub-01_{c}.nii.gz",
                               metadata={}, routing=route_field(field, where=c))
            for c in contrasts}


@pytest.mark.parametrize("on", [True, False])
def test_graph_writes_uncertainty_beside_each_synthetic_image(on):
    from workflows import base
    from workflows.synthesis import ModelChoice

    imgs = _images(("T1w", "FLAIR"))
    models = {c: ModelChoice("default", "ab" * 32, {"Name": "default"}, uncertainty=True)
              for c in imgs}
    wf = base.init_single_subject_wf(subject_id="01", images=imgs, output_dir="/out",
                                     models=models, uncertainty=on)
    names = wf.list_node_names()
    for lc in ("t1w", "flair"):
        assert (f"ds_synthesis_{lc}_wf.ds_ref_unc" in names) is on
        assert (f"ds_synthesis_{lc}_wf.ds_native_unc" in names) is on
        assert (f"synthesis_wf.unc_to_native_{lc}" in names) is on
        assert wf.get_node(f"synthesis_wf.synthesize_{lc}").interface.inputs.uncertainty is on
    if on:
        ds = wf.get_node("ds_synthesis_flair_wf.ds_native_unc").interface
        assert ds.inputs.desc == "uncertainty"
        meta = ds.inputs.meta_dict
        assert meta["Units"].startswith("expected absolute error")
        assert "bids::sub-01/anat/sub-01_space-MRIxFields_desc-uncertainty_FLAIR.nii.gz" \
            in meta["Sources"]
        assert meta["Sources"][0] == "bids:raw:sub-01/anat/sub-01_FLAIR.nii.gz"
        static = wf.get_node("ds_synthesis_flair_wf.meta_ds_ref_synth").interface.inputs.metadata
        assert static["MagneticFieldStrength"] == 7


def test_summary_reaches_the_synthetic_sidecar():
    from workflows.outputs import SidecarMetadata

    res = SidecarMetadata(metadata={"A": 1}, extra={"UncertaintyMeanBrain": 0.01}).run()
    assert res.outputs.out_dict == {"A": 1, "UncertaintyMeanBrain": 0.01}


# --------------------------------------------------------------------------- shipped model
def _shipped(contrast, field):
    syn = load_synthesizer(Registry.load().get(contrast, field))
    if not syn.has_uncertainty:
        pytest.fail("the shipped default model has no uncertainty head")
    return syn


@pytest.mark.parametrize("contrast", ["T1w", "T2w", "FLAIR"])
def test_unseen_lesion_is_flagged(contrast):
    """A lesion no training brain contained: mean uncertainty >= 2x normal white matter (the
    FLAIR lesion, at twice the white matter, through what the input's clip at 1 removed, as in
    the App's synthesis node)."""
    from scipy import ndimage as ndi

    from synth7t.simulate import Simulator

    sim = Simulator.from_labels(str(BRAINWEB))  # Colin27: never used in training
    roi = (slice(60, 300), slice(80, 360), slice(200, 216))
    out = sim.sample(contrast, 1.5, seed=11, roi=roi)
    src, mask = out["source"], out["mask"]
    wm = sim.anatomy.resample(roi)["WM"] > 0.9
    core = ndi.binary_erosion(wm & mask, structure=INPLANE, iterations=6)
    dist = ndi.distance_transform_edt(core[:, :, 8])
    cx, cy = np.unravel_index(int(np.argmax(dist)), dist.shape)
    lesioned, lesion, excess = U.insert_lesion(src, wm & mask, centre=(int(cx), int(cy), 8),
                                               radius=12, contrast=contrast, excess=True,
                                               brain_voxels=int(sim.brain_mask().sum()))
    syn = _shipped(contrast, 1.5)
    _, unc = syn.predict(lesioned, mask, return_uncertainty=True, threads=1)
    U.add_saturation(unc, excess, mask)
    normal = core & ~ndi.binary_dilation(lesion, structure=INPLANE, iterations=16)
    ratio = unc[lesion].mean() / unc[normal].mean()
    assert ratio >= 2.0, ratio
