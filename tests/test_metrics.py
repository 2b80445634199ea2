"""Challenge metrics (synth7t.metrics) and the synth7t-eval command."""
from __future__ import annotations

import csv
import json
import sys

import nibabel as nib
import numpy as np
import pytest
from skimage.metrics import structural_similarity

from synth7t import metrics as M
from synth7t.commands import evaluate

SHAPE = (20, 24, 16)


def _rand(seed, shape=SHAPE):
    return np.random.default_rng(seed).random(shape, dtype=np.float64).astype(np.float32)


def test_nrmse_matches_numpy():
    gt, pred = _rand(0), _rand(1)
    ref = np.sqrt(np.sum((pred.astype(np.float64) - gt.astype(np.float64)) ** 2)) / np.sqrt(
        np.sum(gt.astype(np.float64) ** 2))
    assert abs(M.nrmse(pred, gt) - ref) < 1e-9


def test_ssim_matches_skimage_slicewise():
    gt, pred = _rand(2), _rand(3)
    gt[:, :, 3] = 0.25  # a constant ground-truth slice is skipped
    g, p = gt.astype(np.float64), pred.astype(np.float64)
    dr = g.max() - g.min()
    vals = [structural_similarity(p[:, :, k], g[:, :, k], data_range=dr)
            for k in range(g.shape[2]) if k != 3]
    assert abs(M.ssim(pred, gt) - float(np.mean(vals))) < 1e-9


def test_psnr_definition():
    gt, pred = _rand(4), _rand(5)
    g, p = gt.astype(np.float64), pred.astype(np.float64)
    ref = 10 * np.log10((g.max() - g.min()) ** 2 / np.mean((p - g) ** 2))
    assert abs(M.psnr(pred, gt) - ref) < 1e-9


def test_identical_volumes():
    gt = _rand(6)
    assert M.nrmse(gt, gt) == 0.0
    assert M.ssim(gt, gt) == pytest.approx(1.0, abs=1e-12)
    assert M.psnr(gt, gt) == float("inf")


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        M.nrmse(_rand(0), _rand(0, (4, 4, 4)))


def _phantom(shape=(40, 44, 36), seed=0):
    """A smooth sphere brain: WM core, GM shell, CSF rim (T1w-like intensities)."""
    z, y, x = np.indices(shape)
    c = np.array(shape) / 2
    r = np.sqrt(((z - c[0]) / c[0]) ** 2 + ((y - c[1]) / c[1]) ** 2 + ((x - c[2]) / c[2]) ** 2)
    vol = np.zeros(shape, np.float32)
    vol[r < 0.9] = 0.3   # CSF
    vol[r < 0.75] = 0.6  # GM
    vol[r < 0.5] = 0.95  # WM
    vol += (np.random.default_rng(seed).normal(0, 0.02, shape) * (vol > 0)).astype(np.float32)
    return np.clip(vol, 0, 1)


def test_tissue_dice_identical_and_degraded():
    gt = _phantom()
    same = M.tissue_dice(gt, gt)
    assert all(same[t] == 1.0 for t in ("CSF", "GM", "WM"))
    flat = np.where(gt > 0, 0.5, 0).astype(np.float32)  # contrast destroyed
    worse = M.tissue_dice(flat + 1e-3 * _rand(9, gt.shape) * (gt > 0), gt)
    assert worse["mean"] < 0.8


def test_lpips_absent_and_present(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.delenv("SYNTH7T_LPIPS_WEIGHTS", raising=False)
    assert M.find_lpips_weights(tmp_path) is None
    # Random weights in the on-disk formats (torchvision AlexNet + lpips v0.1 linear layers)
    net = M._build_lpips_net()
    torch.save({f"features.{k}": v for k, v in net.features.state_dict().items()},
               tmp_path / M.ALEXNET_FILE)
    torch.save({f"lin{k}.model.1.weight": net.lins[k].weight.detach().abs()
                for k in range(5)}, tmp_path / M.LPIPS_LIN_FILE)
    model = M.LPIPS.from_local(tmp_path)
    assert model is not None
    a, b = _rand(1, (64, 64, 3)), _rand(2, (64, 64, 3))
    assert model(a, a) == pytest.approx(0.0, abs=1e-7)
    assert model(a, b) > 0


def _save(arr, path, affine=None, *, axcodes: str = "RAS"):
    """Save ``arr`` (RAS voxel order); ``axcodes`` stores it on disk in another voxel order
    (same world positions, e.g. ``"LPS"`` flips two axes, ``"PIL"`` also permutes them)."""
    from nibabel.orientations import axcodes2ornt, ornt_transform

    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(arr.astype(np.float32), np.diag([0.5, 0.5, 0.5, 1]) if affine is None
                          else affine)
    if axcodes != "RAS":
        img = img.as_reoriented(ornt_transform(axcodes2ornt("RAS"), axcodes2ornt(tuple(axcodes))))
        assert nib.aff2axcodes(img.affine) == tuple(axcodes)
    img.to_filename(str(path))


def _reference_scores(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """nRMSE and SSIM by the challenge definitions, from numpy and skimage only (no synth7t):
    ``||p - g|| / ||g||`` in float64; mean over axial slices (axis 2) of skimage SSIM with the
    whole volume's ground-truth range, constant ground-truth slices skipped."""
    p, g = pred.astype(np.float64), gt.astype(np.float64)
    nrmse = float(np.sqrt(np.sum((p - g) ** 2)) / np.sqrt(np.sum(g ** 2)))
    dr = float(g.max() - g.min())
    ssim = float(np.mean([structural_similarity(p[:, :, k], g[:, :, k], data_range=dr)
                          for k in range(g.shape[2]) if np.ptp(g[:, :, k]) > 0]))
    return nrmse, ssim


#: Cases whose ground truth (or prediction) is stored in a non-RAS voxel order on disk: the
#: scorer must bring both to the closest canonical (RAS) orientation before comparing voxels.
GT_AXCODES = {("T1W", "3T", "0002"): "LPS", ("T2W", "0.1T", "0001"): "PIL"}
PRED_AXCODES = {("T2W", "3T", "0002"): "SLA"}


def test_cli_writes_csv_and_json(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    rng = np.random.default_rng(0)
    expected = {}
    for mod in ("T1W", "T2W"):
        for src in ("0.1T", "3T"):
            for cid in ("0001", "0002"):
                truth = _phantom(seed=int(cid))
                truth[3:11, 5:13, 4:9] = 0.8  # off-centre block: a flip or transpose shows
                noisy = np.clip(truth + rng.normal(0, 0.05, truth.shape) * (truth > 0), 0, 1)
                key = (mod, src, cid)
                _save(noisy, pred / mod / f"{src}_to_7T" / "pred" / f"P_{mod}_7T_{cid}.nii.gz",
                      axcodes=PRED_AXCODES.get(key, "RAS"))
                _save(truth, gt / mod / f"{src}_to_7T" / "gt" / f"P_{mod}_7T_{cid}.nii.gz",
                      axcodes=GT_AXCODES.get(key, "RAS"))
                # what was written (float32), in RAS voxel order
                expected[key] = _reference_scores(noisy.astype(np.float32), truth)
    # an extra prediction without ground truth is reported, not scored
    _save(_phantom(), pred / "T1W" / "5T_to_7T" / "pred" / "P_T1W_7T_0009.nii.gz")
    out = tmp_path / "out"
    rc = evaluate.main([str(pred), str(gt), "-o", str(out)])
    assert rc == 0
    text = capsys.readouterr()
    assert "not computed: weights absent" in text.out
    assert "P_T1W_7T_0009" in text.err
    with open(out / "per_case.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["modality"], r["source_field"], r["case"]) for r in rows} == set(expected)
    for r in rows:
        key = (r["modality"], r["source_field"], r["case"])
        assert r["error"] == "", (key, r["error"])
        assert 0 < float(r["nrmse"]) < 0.5 and 0 < float(r["ssim"]) < 1
        assert r["lpips"] == "" and float(r["dice_mean"]) > 0.5
        # every row equals an independent numpy/skimage computation on that pair's arrays
        # (non-RAS files included: scored in the same world positions as the RAS ones)
        want_nrmse, want_ssim = expected[key]
        assert abs(float(r["nrmse"]) - want_nrmse) < 1e-9, (key, r["nrmse"], want_nrmse)
        assert abs(float(r["ssim"]) - want_ssim) < 1e-9, (key, r["ssim"], want_ssim)
    with open(out / "summary.csv") as fh:
        summ = list(csv.DictReader(fh))
    keys = {(s["modality"], s["source_field"]) for s in summ}
    assert {("T1W", "0.1T"), ("T1W", "3T"), ("T2W", "0.1T"), ("T2W", "3T"),
            ("T1W", "all"), ("all", "3T"), ("all", "all")} <= keys
    overall = next(s for s in summ if s["modality"] == "all" and s["source_field"] == "all")
    assert int(overall["n"]) == 8
    assert float(overall["nrmse_mean"]) == pytest.approx(np.mean([float(r["nrmse"]) for r in rows]))
    js = json.loads((out / "metrics.json").read_text())
    assert js["n_pairs"] == 8 and js["lpips_status"] == M.LPIPS_ABSENT
    assert js["tissue_dice_is_proxy"] is True
    assert len(js["unmatched_predictions"]) == 1


def test_cli_bids_naming_and_flat_gt(tmp_path):
    pred, gt = tmp_path / "deriv", tmp_path / "gt7t"
    truth = _phantom()
    _save(truth, gt / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    _save(truth * 0.9, pred / "sub-01" / "anat" / "sub-01_space-MRIxFields_desc-synth7T_T1w.nii.gz")
    (pred / "sub-01" / "anat" / "sub-01_space-MRIxFields_desc-synth7T_T1w.json").write_text(
        json.dumps({"SourceFieldBin": 3.0}))
    rc = evaluate.main([str(pred), str(gt), "-o", str(tmp_path / "o"), "--tissue-method", "none"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "o" / "per_case.csv")))
    assert len(rows) == 1 and rows[0]["source_field"] == "3T" and rows[0]["case"] == "sub-01"
    assert float(rows[0]["nrmse"]) == pytest.approx(0.1, rel=1e-5)


def test_cli_nothing_matches(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert evaluate.main([str(tmp_path / "a"), str(tmp_path / "b"), "-o", str(tmp_path / "o")]) == 66


def test_lpips_equals_the_lpips_package(tmp_path, monkeypatch):
    """Same numbers as lpips.LPIPS(net='alex', version='0.1') given the same backbone weights.

    Runs only where the ``lpips`` package is installed (not a dependency). The AlexNet backbone is
    randomly initialised (pnet_rand=True: nothing is downloaded); the linear layers are the real
    v0.1 weights shipped inside the lpips package. Without torchvision a stub with torchvision's
    AlexNet layer layout stands in.
    """
    torch = pytest.importorskip("torch")
    from torch import nn

    try:
        import torchvision  # noqa: F401
    except Exception:
        import types

        class _AlexNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(
                    nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                    nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
                    nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
                    nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
                    nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True),
                    nn.MaxPool2d(3, 2))

        tv, tvm = types.ModuleType("torchvision"), types.ModuleType("torchvision.models")
        tvm.alexnet = lambda pretrained=False, **kw: _AlexNet()
        tvm.vgg16 = tvm.squeezenet1_1 = None
        tv.models = tvm
        monkeypatch.setitem(sys.modules, "torchvision", tv)
        monkeypatch.setitem(sys.modules, "torchvision.models", tvm)
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    ref = lpips.LPIPS(net="alex", version="0.1", pretrained=True, pnet_rand=True,
                      verbose=False).eval()
    feats = {}
    for i, sl in enumerate((ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4,
                            ref.net.slice5)):
        for name, mod in sl.named_children():
            for k, v in mod.state_dict().items():
                feats[f"features.{name}.{k}"] = v
    torch.save(feats, tmp_path / M.ALEXNET_FILE)
    torch.save({f"lin{k}.model.1.weight": ref.lins[k].model[-1].weight for k in range(5)},
               tmp_path / M.LPIPS_LIN_FILE)
    mine = M.LPIPS.from_local(tmp_path)
    rng = np.random.default_rng(3)
    for _ in range(3):
        a = rng.random((64, 72)).astype(np.float32)
        b = np.clip(a + rng.normal(0, 0.1, a.shape), 0, 1).astype(np.float32)

        def t(x):
            return torch.from_numpy(x * 2.0 - 1.0).float()[None, None].repeat(1, 3, 1, 1)

        with torch.no_grad():
            expected = float(ref(t(a), t(b)).item())
        assert mine.slice_distance(a, b) == pytest.approx(expected, rel=1e-5, abs=1e-7)
