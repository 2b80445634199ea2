"""Self-supervised pretraining on unpaired images (synth7t.pretrain, synth7t-train
--pretrain-unpaired) on tiny generated MRIxFields/BIDS trees: seconds on one CPU thread."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from synth7t.commands.train import main as train_main
from synth7t.fields import SUPPORTED_BINS
from synth7t.inference import UNetSynthesizer, load_synthesizer
from synth7t.networks import N_COND
from synth7t.pretrain import (MaskedPatchSampler, PretrainConfig, PretrainTrainer,
                              UnpairedSource, _Reader, masked_loss, masked_sampler,
                              pretrain_condition, validation_batches)
from synth7t.registry import ModelIntegrityError, Registry, sha256_file
from synth7t.sources import unpaired_volumes

N = 32
TINY = ["--patch", "32", "--base", "4", "--n-slices", "3", "--batch-size", "4",
        "--slab-depth", "8", "--pool-size", "4", "--val-slabs", "6", "--no-progress",
        "--threads", "1"]
PRE = [*TINY, "--mask-patch", "4"]


def _brain(seed: int, shape=(N, N, N), *, head: bool = False) -> np.ndarray:
    """A brain-like volume: ellipsoid, WM core / GM shell with smooth folding and texture, zero
    background (or, with ``head``, a bright skull ring and background noise, unnormalised)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    fold = 0.08 * np.sin(6 * x + seed) * np.cos(5 * y - seed) * np.sin(4 * z)
    r = np.sqrt((x / 0.9) ** 2 + (y / 0.8) ** 2 + (z / 0.85) ** 2)
    tex = 0.04 * np.sin(9 * x + 3 * seed) * np.sin(7 * y) + 0.03 * np.cos(8 * z + seed)
    img = np.where(r < 0.55 + fold, 0.85, np.where(r < 0.8, 0.55, 0.0)) + tex * (r < 0.8)
    img = np.clip(img, 0, 1) * (r < 0.8)
    if head:
        img = 900 * img + 1200 * ((r > 0.88) & (r < 0.97)) + rng.normal(20, 5, shape).clip(0)
    return img.astype(np.float32)


def _save(arr, path, zooms=(0.5, 0.5, 0.5), affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    aff = np.diag([*zooms, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(arr, aff), str(path))
    return path


@pytest.fixture()
def unpaired_tree(tmp_path):
    return make_unpaired_tree(tmp_path / "unpaired")


def make_unpaired_tree(root):
    """MRIxFields R_ volumes and a small BIDS dataset under one root."""
    retro = root / "Training_retrospective"
    for k, (mod, fld) in enumerate([("T1W", "1.5T"), ("T1W", "3T"), ("T2W", "0.1T"),
                                     ("T2FLAIR", "5T"), ("T1W", "7T"), ("T2W", "7T")]):
        _save(_brain(k), retro / mod / fld / f"R_{mod}_{fld}_{k:04d}.nii.gz")
    # never used: paired volumes (validation/test splits hold only those), odd names
    _save(_brain(50), root / "Training_prospective" / "T1W" / "3T" / "P_T1W_3T_0001.nii.gz")
    _save(_brain(51), root / "Validating_prospective" / "T1W" / "3T" / "P_T1W_3T_0002.nii.gz")
    _save(_brain(52), retro / "PD" / "3T" / "R_PD_3T_0099.nii.gz")
    (retro / "T1W" / "3T" / "R_T1W_3T_0098.json").write_text("{}")
    # BIDS: inherited field (root T1w.json), 7 T FLAIR, T2w without a field; 1 mm whole heads
    (root / "dataset_description.json").write_text(json.dumps({"Name": "t", "BIDSVersion": "1.9.0"}))
    (root / "T1w.json").write_text(json.dumps({"MagneticFieldStrength": 2.89}))
    _save(_brain(60, (N // 2,) * 3, head=True), root / "sub-01" / "anat" / "sub-01_T1w.nii.gz",
          zooms=(1.0, 1.0, 1.0))
    ses = root / "sub-02" / "ses-a" / "anat"
    _save(_brain(61, (N // 2,) * 3, head=True), ses / "sub-02_ses-a_FLAIR.nii.gz",
          zooms=(1.0, 1.0, 1.0))
    (ses / "sub-02_ses-a_FLAIR.json").write_text(json.dumps({"MagneticFieldStrength": 7}))
    _save(_brain(62, (N // 2,) * 3, head=True), ses / "sub-02_ses-a_T2w.nii.gz",
          zooms=(1.0, 1.0, 1.0))
    _save(_brain(63, (N // 2,) * 3), ses / "sub-02_ses-a_PD.nii.gz", zooms=(1.0, 1.0, 1.0))
    _save(np.zeros((8, 8, 8, 3), np.float32), root / "sub-01" / "func" / "sub-01_bold.nii.gz")
    _save(_brain(64), root / "derivatives" / "x" / "sub-01" / "anat" / "sub-01_T1w.nii.gz")
    return root


def test_unpaired_volumes_finds_r_volumes_and_bids_images(unpaired_tree):
    vols = unpaired_volumes(unpaired_tree)
    got = {(str(v.path.relative_to(unpaired_tree)), v.contrast, v.field_bin) for v in vols}
    retro = "Training_retrospective"
    assert got == {
        (f"{retro}/T1W/1.5T/R_T1W_1.5T_0000.nii.gz", "T1w", 1.5),
        (f"{retro}/T1W/3T/R_T1W_3T_0001.nii.gz", "T1w", 3.0),
        (f"{retro}/T2W/0.1T/R_T2W_0.1T_0002.nii.gz", "T2w", 0.1),
        (f"{retro}/T2FLAIR/5T/R_T2FLAIR_5T_0003.nii.gz", "FLAIR", 5.0),
        (f"{retro}/T1W/7T/R_T1W_7T_0004.nii.gz", "T1w", 7.0),
        (f"{retro}/T2W/7T/R_T2W_7T_0005.nii.gz", "T2w", 7.0),
        ("sub-01/anat/sub-01_T1w.nii.gz", "T1w", 3.0),            # 2.89 T inherited from root
        ("sub-02/ses-a/anat/sub-02_ses-a_FLAIR.nii.gz", "FLAIR", 7.0),
        ("sub-02/ses-a/anat/sub-02_ses-a_T2w.nii.gz", "T2w", None),  # no field anywhere
    }
    assert len(vols) == len(got)
    only = unpaired_volumes(unpaired_tree, contrasts=["FLAIR"], fields=[7.0])
    assert [v.path.name for v in only] == ["sub-02_ses-a_FLAIR.nii.gz"]


def test_reader_gives_canonical_slabs_of_any_orientation(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((6, 7, 9)).astype(np.float32)
    # file axes: (z flipped, x, y flipped), voxel 2 x 1 x 3 mm
    aff = np.array([[0, 1.0, 0, 0], [0, 0, -3.0, 20], [-2.0, 0, 0, 10], [0, 0, 0, 1]])
    path = _save(data, tmp_path / "odd.nii.gz", affine=aff)
    canon = np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj, np.float32)
    r = _Reader(path)
    assert r.nz == canon.shape[2] == 6 and r.zooms == (1.0, 3.0, 2.0)
    assert np.array_equal(r.read(0, r.nz), canon)
    assert np.array_equal(r.read(1, 4), canon[:, :, 1:4])


def test_masking_hides_cells_keeps_target_and_conditions(unpaired_tree):
    vols = [v for v in unpaired_volumes(unpaired_tree) if v.path.name.startswith("R_")]
    src = UnpairedSource(vols, depth=8)
    sampler = MaskedPatchSampler([(src, 1.0)], np.random.default_rng(3), mask_ratio=0.5,
                                 mask_patch=4, tube_fraction=0.5, n_slices=3, patch=32,
                                 pool_size=6, refresh_every=0)
    x, y, m, c, hole = sampler.batch(16)
    assert x.shape == (16, 3, 32, 32) and y.shape == m.shape == hole.shape == (16, 1, 32, 32)
    h = hole.bool()
    assert 0.35 < float(hole.mean()) < 0.65
    assert (x[:, 1:2][h] == 0).all()                                  # hidden on the centre slice
    assert torch.equal(x[:, 1:2][~h], y[~h])                          # visible pixels untouched
    assert float((y * m)[h].abs().sum()) > 0                          # the target keeps them
    # some hidden cells go through the whole stack, others hide the centre slice only
    inside = h & m.bool() & (y > 0)
    both = inside & (x[:, 0:1] == 0) & (x[:, 2:3] == 0)
    assert 0 < int(both.sum()) < int(inside.sum())
    # conditioning: field one-hot for supported bins, contrast only for 7 T / unknown
    assert torch.equal(pretrain_condition("T2w", 1.5)[:len(SUPPORTED_BINS)],
                       torch.tensor([0.0, 1.0, 0.0, 0.0]))
    for fb in (7.0, float("nan"), None):
        v = pretrain_condition("FLAIR", fb)
        assert v.shape == (N_COND,) and v[:len(SUPPORTED_BINS)].sum() == 0 and v[-1] == 1
    assert set(c.sum(dim=1).tolist()) <= {1.0, 2.0} and 1.0 in c.sum(dim=1).tolist()


def test_unpaired_source_resamples_and_masks_whole_heads(unpaired_tree):
    vols = [v for v in unpaired_volumes(unpaired_tree) if v.path.name == "sub-01_T1w.nii.gz"]
    src = UnpairedSource(vols, depth=8, voxel_mm=0.5)
    slab = src.make(np.random.default_rng(0))[0]
    assert slab.source.shape[2] == 8 and slab.source.shape[0] > N // 2  # 1 mm -> 0.5 mm
    assert 0 <= slab.source.min() and slab.source.max() <= 1 and slab.source[slab.mask].mean() > 0.2
    assert not slab.source[~slab.mask].any()
    assert slab.contrast == "T1w" and slab.field_bin == 3.0


def test_masked_loss_scores_only_hidden_brain_pixels():
    g = torch.Generator().manual_seed(0)
    y = torch.rand(2, 1, 40, 40, generator=g)
    brain = torch.zeros_like(y)
    brain[..., 4:36, 4:36] = 1
    hole = torch.zeros_like(y)
    hole[..., 14:22, 14:22] = 1
    pred = y.clone()
    pred[brain == 0] = 1.0                                  # outside the brain: not scored
    assert float(masked_loss(pred, y, hole, brain, visible_weight=0.0)[0]) < 1e-6
    far = brain.clone()                                     # visible, beyond the SSIM window
    far[..., 11:25, 11:25] = 0
    vis = pred.clone()
    vis[far == 1] += 0.3                                    # visible error: only via its weight
    assert float(masked_loss(vis, y, hole, brain, visible_weight=0.0)[0]) < 1e-6
    assert float(masked_loss(vis, y, hole, brain, visible_weight=1.0)[0]) > 0.2
    bad = pred.clone()
    bad[hole == 1] = 0.0                                    # a hole left empty
    loss, parts = masked_loss(bad, y, hole, brain, visible_weight=0.0)
    assert parts["l1"] == pytest.approx(float(y[..., 14:22, 14:22].mean()), rel=1e-5)
    assert float(loss) > 0.4


def test_pretraining_loss_falls(tmp_path, unpaired_tree):
    vols = unpaired_volumes(unpaired_tree)
    cfg = PretrainConfig(steps=120, batch_size=4, patch=32, n_slices=3, base=8, lr=3e-3,
                         warmup=5, pool_size=6, refresh_every=4, slab_depth=8,
                         checkpoint_every=60, seed=0, mask_patch=4, val_batches=3,
                         uncertainty=True, ema_decay=0.99)
    assert cfg.visible_weight == 1.0 and cfg.fill == "zero"  # the defaults under test
    src = UnpairedSource(vols, depth=8)
    val = validation_batches(vols, cfg, seed=99)
    steps: list[float] = []

    class Recording(PretrainTrainer):
        def compute_loss(self, batch):
            loss, parts = super().compute_loss(batch)
            steps.append(float(loss.detach()))
            return loss, parts

    trainer = Recording(cfg, lambda rng: masked_sampler([(src, 1.0)], rng, cfg), tmp_path,
                        val_batches=val, log=lambda m: None)
    before = trainer.masked_eval(trainer.net)
    trainer.run(progress=False)
    after = trainer.masked_eval(trainer.eval_net)
    first, last = float(np.mean(steps[:20])), float(np.mean(steps[-20:]))
    print(f"held-out masked loss {before['loss']:.3f} -> {after['loss']:.3f} "
          f"(L1 hidden {before['l1']:.3f} -> {after['l1']:.3f}, SSIM hidden "
          f"{before['ssim']:.3f} -> {after['ssim']:.3f}); training steps 1-20 {first:.3f}, "
          f"101-120 {last:.3f}")
    assert len(steps) == 120
    assert last < 0.75 * first, (first, last)
    assert after["loss"] < 0.75 * before["loss"], (before, after)
    assert after["l1"] < 0.6 * before["l1"] and after["ssim"] > before["ssim"] + 0.1
    # the visible pixels stay close to a copy (fine-tuning starts near the identity)
    assert after["l1_visible"] < 0.1
    state = json.loads((tmp_path / "checkpoints" / "state.json").read_text())
    assert state["step"] == 120 and state["config"]["mask_ratio"] == 0.5
    assert [v["step"] for v in state["val_history"]] == [60, 120]
    assert (tmp_path / "checkpoints" / "best.safetensors").is_file()


@pytest.fixture()
def paired_tree(tmp_path):
    root = tmp_path / "paired"
    for ident in ("0001", "0002"):
        src = _brain(int(ident), (N, N, 16))
        tgt = np.clip(1.1 * src ** 1.5, 0, 1).astype(np.float32)
        _save(src, root / "Training_prospective" / "T1W" / "1.5T" / f"P_T1W_1.5T_{ident}.nii.gz")
        _save(tgt, root / "Training_prospective" / "T1W" / "7T" / f"P_T1W_7T_{ident}.nii.gz")
    return root


def test_pretrain_cli_then_finetune_and_load(tmp_path, unpaired_tree, paired_tree):
    from safetensors.torch import load_file

    pre = tmp_path / "pre"
    assert train_main(["--pretrain-unpaired", str(unpaired_tree), "--out", str(pre),
                       "--steps", "8", "--checkpoint-every", "4", "--seed", "3", *PRE]) == 0
    reg = Registry.load(pre)
    entry = reg.get("FLAIR", 0.1, "pretrained")
    mine = [e for e in reg if e.file == pre / "model.safetensors"]
    assert {e.name for e in mine} == {"pretrained"} and len(mine) == 12 and entry in mine
    card = json.loads((pre / "model_card.json").read_text())
    assert card["SHA256"] == sha256_file(pre / "model.safetensors") == entry.sha256
    assert card["Steps"] == 8 and "not a 7T synthesis model" in card["Description"]
    assert "9 unpaired images" in card["TrainingData"] and "T1w@7T: 1" in card["TrainingData"]
    assert "loss" in card["Metrics"]["masked_reconstruction"]["mean"]
    assert card["Recipe"]["mask_patch"] == 4 and card["Recipe"]["fill"] == "zero"
    syn = load_synthesizer(entry)  # SHA-256 verified
    assert isinstance(syn, UNetSynthesizer)
    vol = _brain(7)
    out = syn.predict(vol, vol > 0)
    assert out.shape == vol.shape and 0 <= out.min() and out.max() <= 1

    # same seed -> the same weights; another seed -> other weights
    again = tmp_path / "again"
    assert train_main(["--pretrain-unpaired", str(unpaired_tree), "--out", str(again),
                       "--steps", "8", "--checkpoint-every", "4", "--seed", "3", *PRE]) == 0
    other = tmp_path / "other"
    assert train_main(["--pretrain-unpaired", str(unpaired_tree), "--out", str(other),
                       "--steps", "8", "--checkpoint-every", "4", "--seed", "4", *PRE]) == 0
    # (tensors, not file hashes: safetensors writes its metadata keys in a random order)
    w = {d.name: load_file(str(d / "model.safetensors")) for d in (pre, again, other)}
    assert all(torch.equal(w["pre"][k], w["again"][k]) for k in w["pre"])
    assert not all(torch.equal(w["pre"][k], w["other"][k]) for k in w["pre"])

    # resume goes on from the checkpoint
    assert train_main(["--pretrain-unpaired", str(unpaired_tree), "--out", str(again),
                       "--steps", "12", "--checkpoint-every", "4", "--seed", "3", "--resume",
                       *PRE]) == 0
    state = json.loads((again / "checkpoints" / "state.json").read_text())
    assert state["step"] == 12 and json.loads((again / "model_card.json").read_text())["Steps"] == 12

    # paired data cannot be mixed in (two commands: pretrain, then fine-tune)
    assert train_main(["--pretrain-unpaired", str(unpaired_tree), "--simulated", "--out",
                       str(tmp_path / "x"), *PRE]) == 64
    assert train_main(["--pretrain-unpaired", str(tmp_path / "empty"), "--out",
                       str(tmp_path / "x"), *PRE]) == 66

    # fine-tune from the pretrained weights on paired volumes
    ft = tmp_path / "ft"
    assert train_main(["--init-from", "pretrained", "--model-dir", str(pre), "--mrixfields",
                       str(paired_tree), "--out", str(ft), "--steps", "4",
                       "--checkpoint-every", "2", "--contrasts", "T1w", "--fields", "1.5",
                       *TINY]) == 0
    ft_entry = Registry.load(ft).get("T1w", 1.5)
    ft_card = json.loads((ft / "model_card.json").read_text())
    assert "initialised from registry model 'pretrained'" in ft_card["TrainingData"]
    assert ft_entry.sha256 == sha256_file(ft / "model.safetensors")
    ft_syn = load_synthesizer(ft_entry)
    assert ft_syn.predict(vol[..., :16], vol[..., :16] > 0).max() <= 1
    # ... and it did start from them: 4 small steps away, far from a fresh network
    fresh = tmp_path / "fresh"
    assert train_main(["--mrixfields", str(paired_tree), "--out", str(fresh), "--steps", "4",
                       "--checkpoint-every", "2", "--contrasts", "T1w", "--fields", "1.5",
                       "--lr", "2e-4", *TINY]) == 0
    w_pre, w_ft, w_fresh = (load_file(str(d / "model.safetensors")) for d in (pre, ft, fresh))
    assert set(w_pre) == set(w_ft)
    d_ft = max(float((w_ft[k] - w_pre[k]).abs().max()) for k in w_pre)
    d_fresh = max(float((w_fresh[k] - w_pre[k]).abs().max()) for k in w_pre)
    print(f"max |w_ft - w_pretrained| {d_ft:.2e}, max |w_fresh - w_pretrained| {d_fresh:.2e}")
    assert d_ft < 0.01 < d_fresh, (d_ft, d_fresh)

    # tampered pretrained weights are refused
    data = bytearray((pre / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (pre / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError):
        load_synthesizer(Registry.load(pre).get("T1w", 3.0, "pretrained"))
