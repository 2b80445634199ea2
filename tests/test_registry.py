"""Model registry, integrity checks and the baseline synthesiser."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import torch

from synth7t.fields import CONTRASTS, SUPPORTED_BINS
from synth7t.inference import (UNetSynthesizer, load_synthesizer, mask_bbox, resolve_device,
                               save_unet)
from synth7t.networks import UNet25D, UNetConfig
from synth7t.registry import (MODELS_DIR, ModelIntegrityError, Registry, RegistryError,
                              sha256_file)


def _phantom(shape=(40, 48, 24), seed=0):
    """Three 'tissues' in a sphere, T1w-like (CSF dark, WM bright), with noise."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    r = np.sqrt(x ** 2 + y ** 2 + z ** 2)
    mask = r < 0.9
    vol = np.where(r < 0.45, 0.9, np.where(r < 0.7, 0.55, 0.12)).astype(np.float32)
    vol = np.clip(vol + rng.normal(0, 0.03, shape), 0, 1).astype(np.float32) * mask
    return vol, mask


def _copy_registry_entry(tmp_path, entry, *, name="default", **changes):
    """A --model-dir holding a copy of ``entry``'s files and a one-entry registry."""
    shutil.copy(entry.file, tmp_path / entry.file.name)
    shutil.copy(entry.card, tmp_path / entry.card.name)
    raw = {"name": name, "kind": entry.kind, "contrast": entry.contrast,
           "field_bin": entry.field_bin, "version": entry.version, "file": entry.file.name,
           "sha256": entry.sha256, "card": entry.card.name}
    raw.update(changes)
    (tmp_path / "registry.json").write_text(json.dumps({"models": [raw]}))
    return raw


def test_all_pairs_resolve_and_verify():
    reg = Registry.load()
    for c in CONTRASTS:
        for b in SUPPORTED_BINS:
            for name in ("default", "baseline"):
                entry = reg.get(c, b, name)
                assert entry.file.is_file() and entry.card.is_file()
                assert sha256_file(entry.file) == entry.sha256
            base = reg.get(c, b, "baseline")
            assert base.provenance()["Description"].startswith("baseline: non-deep")
            load_synthesizer(reg.get(c, b))  # SHA-256 verified on load
    # MRIxFields spellings are accepted at the edge
    assert reg.get("T2FLAIR", "3T").contrast == "FLAIR"
    with pytest.raises(RegistryError):
        reg.get("T1w", 2.0)


def test_default_provenance_is_labelled():
    prov = Registry.load().get("T1w", 3.0).provenance()
    for key in ("Name", "Kind", "Version", "SHA256", "TrainingData", "Metrics", "Description"):
        assert key in prov
    if prov["Kind"] == "baseline":
        assert prov["Description"].startswith("baseline: non-deep")
    json.dumps(prov)  # goes into a JSON sidecar


def test_tampered_file_refused(tmp_path):
    entry = Registry.load().get("T2w", 1.5, "baseline")
    _copy_registry_entry(tmp_path, entry)
    with open(tmp_path / entry.file.name, "a") as fh:
        fh.write(" ")
    bad = Registry.load(tmp_path).get("T2w", 1.5)
    with pytest.raises(ModelIntegrityError) as err:
        load_synthesizer(bad)
    msg = str(err.value)
    assert entry.file.name in msg and "SHA-256" in msg and "\n" not in msg


def test_pickle_refused(tmp_path):
    weights = tmp_path / "evil.pt"
    with open(weights, "wb") as fh:
        pickle.dump({"w": [1, 2, 3]}, fh)
    card = tmp_path / "card.json"
    card.write_text("{}")
    for fname in ("evil.pt", "evil.safetensors"):
        if fname != "evil.pt":
            shutil.copy(weights, tmp_path / fname)
        raw = {"name": "default", "kind": "unet", "contrast": "T1w", "field_bin": 3.0,
               "version": "x", "file": fname, "sha256": sha256_file(tmp_path / fname),
               "card": "card.json"}
        (tmp_path / "registry.json").write_text(json.dumps({"models": [raw]}))
        entry = Registry.load(tmp_path).get("T1w", 3.0)
        with pytest.raises(ModelIntegrityError) as err:
            load_synthesizer(entry)
        assert fname in str(err.value) and "refused" in str(err.value)


def test_model_dir_overrides_and_extends(tmp_path):
    torch.manual_seed(0)
    net = UNet25D(UNetConfig(base=4, levels=3, n_slices=3))
    sha = save_unet(net, tmp_path / "tiny.safetensors")
    (tmp_path / "tiny_card.json").write_text(json.dumps({"TrainingData": "test", "Metrics": {}}))
    entries = [{"name": n, "kind": "unet", "contrast": "FLAIR", "field_bin": 0.1, "version": "t",
                "file": "tiny.safetensors", "sha256": sha, "card": "tiny_card.json"}
               for n in ("default", "mine")]
    (tmp_path / "registry.json").write_text(json.dumps({"schema": "synth7t-registry/1",
                                                        "models": entries}))
    shipped = Registry.load()
    reg = Registry.load(tmp_path)
    assert reg.get("FLAIR", 0.1).kind == "unet"           # override
    assert reg.get("FLAIR", 0.1, "mine").file.parent == tmp_path.resolve()  # extension
    assert reg.get("T1w", 1.5) == shipped.get("T1w", 1.5)  # untouched entries survive
    syn = load_synthesizer(reg.get("FLAIR", 0.1, "mine"))
    assert isinstance(syn, UNetSynthesizer)
    vol, mask = _phantom()
    out = syn.predict(vol, mask, batch_size=3, tta=True, threads=1)
    assert out.dtype == np.float32 and out.shape == vol.shape
    assert out.min() >= 0 and out.max() <= 1 and not out[~mask].any()
    np.testing.assert_array_equal(out, syn.predict(vol, mask, batch_size=5, tta=True, threads=1))
    with pytest.raises(RegistryError):
        Registry.load(tmp_path / "nowhere")


@pytest.mark.parametrize("contrast", CONTRASTS)
def test_baseline_output_range_mask_and_determinism(contrast):
    vol, mask = _phantom()
    if contrast != "T1w":  # invert so CSF is bright, as in T2w/FLAIR-like ordering
        vol = np.where(mask, 1.0 - vol, 0).astype(np.float32)
    syn = load_synthesizer(Registry.load().get(contrast, 3.0, "baseline"))
    out = syn.predict(vol, mask)
    assert out.dtype == np.float32 and out.shape == vol.shape
    assert out.min() >= 0 and out.max() <= 1
    assert not out[~mask].any() and out[mask].std() > 0.05
    np.testing.assert_array_equal(out, syn.predict(vol.copy(), mask.copy()))


def test_baseline_maps_tissue_medians():
    vol, mask = _phantom()
    reg = Registry.load()
    entry = reg.get("T1w", 1.5, "baseline")
    params = json.loads(entry.file.read_text())
    out = load_synthesizer(entry).predict(vol, mask)
    r = np.sqrt(sum(g ** 2 for g in np.meshgrid(*[np.linspace(-1, 1, n) for n in vol.shape],
                                               indexing="ij")))
    wm = np.median(out[mask & (r < 0.4)])
    assert abs(wm - params["targets_7t"]["T1w"]["WM"]) < 0.05


def test_resolve_device_and_bbox():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError):
            resolve_device("cuda")
    mask = np.zeros((50, 60, 20), bool)
    mask[10:20, 5:50, 3:9] = True
    box = mask_bbox(mask, margin=2)
    for s in box[:2]:
        assert (s.stop - s.start) % 16 == 0
    assert box[2] == slice(1, 11)


def test_shipped_models_dir_has_no_pickles():
    for path in MODELS_DIR.iterdir():
        assert path.suffix not in {".pt", ".pth", ".pkl", ".ckpt", ".bin"}, path


def test_folded_network_computes_the_same_function_for_its_pair():
    """FiLM folded into the convolutions (what a one-pair synthesiser runs) gives the network's
    own output and uncertainty for that pair, and leaves the original network untouched."""
    from synth7t.networks import condition_vector

    torch.manual_seed(0)
    net = UNet25D(UNetConfig(base=8, levels=3, uncertainty=True)).eval()
    with torch.no_grad():  # non-trivial FiLM and heads (they start at identity / zero)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cond = condition_vector("FLAIR", 3.0)[None].expand(2, -1)
    x = torch.rand(2, 5, 32, 48)
    folded = net.folded(cond[0])
    with torch.inference_mode():
        y, b = net.forward_with_uncertainty(x, cond)
        yf, bf = folded.forward_with_uncertainty(x, cond)
    assert torch.allclose(y, yf, atol=1e-5) and torch.allclose(b, bf, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    other = condition_vector("T1w", 0.1)[None].expand(2, -1)
    with torch.inference_mode():  # folded for FLAIR 3 T: another pair is not what it computes
        assert not torch.allclose(net(x, other), folded(x, other), atol=1e-4)


def test_saving_a_network_gives_the_same_bytes_every_time(tmp_path):
    """The safetensors writer orders the metadata by a per-map random hash: saved as it
    writes it, one network gave up to six different files in six saves."""
    from safetensors.torch import load_file

    from synth7t.inference import save_unet

    net = UNet25D(UNetConfig(n_slices=3, base=4, levels=2))
    shas = {save_unet(net, tmp_path / f"m{i}.safetensors",
                      extra_metadata={"version": "1.0.0", "name": "default"}) for i in range(6)}
    assert len(shas) == 1
    back = load_file(str(tmp_path / "m0.safetensors"))
    assert all(torch.equal(back[k], v) for k, v in net.state_dict().items())


def test_shipped_default_has_a_reference_level_for_every_pair():
    """The App's out-of-distribution flag starts from each pair's own normal level."""
    from synth7t.intensity import level_key
    from synth7t.uncertainty import THRESHOLD, ood_threshold

    reg = Registry.load()
    refs = {}
    for c in CONTRASTS:
        for fb in SUPPORTED_BINS:
            syn = load_synthesizer(reg.get(c, fb, "default"))
            refs[(c, fb)] = syn.config.uncertainty_reference[level_key(c, fb)]
    assert all(0 < r < 1 for r in refs.values())
    # a normal 0.1 T source's expected error is mostly its noise: above the fixed threshold
    assert ood_threshold(refs[("T1w", 0.1)]) > THRESHOLD >= ood_threshold(None)
    assert ood_threshold(refs[("T1w", 5.0)]) == THRESHOLD
