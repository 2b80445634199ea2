"""Benchmark of the ``group`` level: ``synth7t bids out group`` over generated participants.

Generates a study of N participants (default 200) as the participant level leaves it: a tiny
input dataset (folders only; a few participants never run), run records with QC values
(``logs/sub-<label>/run-<uuid>.json``), synthetic-image sidecars with numeric keys, report
figures (1300 x 380 PNG mosaics, as the report writes) and reports; some participants refused
(BIDS validation, bad data), one crashed, one with its brain volume doubled. Then it runs the
group level through the real command (``bids_app.run.main``, in-process and as a subprocess)
and prints a table. Usage::

    NIPYPE_NO_ET=1 python benchmarks/bench_group.py [--n 200] [--keep DIR]

The acceptance limit is 10 s for 200 participants (issue 12).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LIMIT_S = 10.0


def _figure_png(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:380, 0:1300]
    data = (120 + 80 * np.sin(xx / 23.0) * np.cos(yy / 17.0)
            + rng.normal(0, 20, (380, 1300))).clip(0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(data).save(buf, format="PNG")
    return buf.getvalue()


#: The generated study's protocol (ms, degrees), as run records carry it.
PROTOCOLS = {"T1w": {"TR": 2300.0, "TE": 2.98, "TI": 900.0, "FA": 9.0},
             "T2w": {"TR": 3200.0, "TE": 408.0, "FA": 120.0}}


def make_study(root: Path, n: int = 200, *, seed: int = 0, doubled: str | None = "007",
               off_protocol: str | None = "013", not_run: int = 3,
               thumbnails: bool = True) -> tuple[Path, Path]:
    """Write ``root/bids`` (folders only) and ``root/out`` (records, sidecars, figures).

    Returns (bids_dir, out_dir). Participant ``doubled`` gets twice the typical brain volume,
    ``off_protocol`` a T1w inversion time of 1100 ms for the study's 900;
    labels 3 and 5 (mod 50) are refused, 11 crashed; the last ``not_run`` have no record.
    """
    rnd = random.Random(seed)
    bids, out = root / "bids", root / "out"
    (bids).mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "generated study", "BIDSVersion": "1.9.0"}))
    (out / "logs").mkdir(parents=True)
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "synth7t derivatives of generated study", "BIDSVersion": "1.9.0",
         "DatasetType": "derivative", "GeneratedBy": [{"Name": "synth7t"}]}))
    png = _figure_png(seed)
    fig0 = root / "figure.png"
    fig0.write_bytes(png)
    from bids_app.group import thumbnail_jpeg

    thumb = thumbnail_jpeg(fig0)
    for k in range(n):
        label = f"{k:03d}"
        (bids / f"sub-{label}" / "anat").mkdir(parents=True)
        if k >= n - not_run:
            continue
        rec = {"participant": label, "run_uuid": f"20261129-000000_{k:08d}",
               "end_time": "2026-11-29T20:00:00+00:00", "elapsed_seconds": 120 + rnd.random()
               * 30, "sessions": [], "warnings": [], "errors": [], "inputs": []}
        if k % 50 in (3, 5):
            what = (f"/data/bids/sub-{label}/anat/sub-{label}_T1w.nii.gz: BIDS validation "
                    "error NIFTI_HEADER_UNREADABLE" if k % 50 == 3 else
                    f"/data/bids/sub-{label}/anat/sub-{label}_T1w.nii.gz: empty image")
            rec.update(status="refused", exit_code=16 if k % 50 == 3 else 65, errors=[what])
        else:
            crashed = k % 50 == 11
            rec.update(status="crashed" if crashed else "ok", exit_code=1 if crashed else 0,
                       errors=["crash-x.txt: RuntimeError: boom"] if crashed else [])
            contrasts = ["T1w", "T2w"] if k % 3 else ["T1w"]
            volume = rnd.gauss(1250, 60) * (2 if label == doubled else 1)
            dice = rnd.gauss(0.95, 0.01)
            for c in contrasts:
                stem = f"sub-{label}/anat/sub-{label}_space-MRIxFields_desc-synth7T_{c}"
                side = out / f"{stem}.json"
                side.parent.mkdir(parents=True, exist_ok=True)
                side.write_text(json.dumps({
                    "MagneticFieldStrength": 7, "SourceMagneticFieldStrength": 3,
                    "SourceFieldBin": 3.0, "RandomSeed": 0,
                    "UncertaintyMeanBrain": rnd.gauss(0.05, 0.005),
                    "UncertaintyThreshold": 0.1, "UncertaintyOutOfDistribution": k == 1,
                    "SynthesisModel": {"Name": "default", "Version": "1.0.0"}}))
                rec["inputs"].append({
                    "contrast": c, "session": None,
                    "source": f"sub-{label}/anat/sub-{label}_{c}.nii.gz",
                    "field": {"raw": 3, "bin": 3.0, "source": "sidecar", "passthrough": False},
                    "protocol": dict(PROTOCOLS[c], **({"TI": 1100.0} if label == off_protocol
                                                      and c == "T1w" else {})),
                    "model": {"Name": "default", "Version": "1.0.0"},
                    "derivatives": {"synth": f"{stem}.nii.gz"},
                    "qc": {"BrainVolumeML": round(volume, 2), "RegistrationDice": round(dice, 4),
                           "NoiseReduction": round(rnd.gauss(0.4, 0.03), 4),
                           "TissueAgreementDice": round(rnd.gauss(0.8, 0.02), 4)}})
            figs = out / f"sub-{label}" / "figures"
            figs.mkdir(parents=True, exist_ok=True)
            (figs / f"sub-{label}_desc-synth7Taxial_T1w.png").write_bytes(png)
            if thumbnails:  # as the participant level leaves them (bids_app.group)
                (figs / f"sub-{label}_desc-thumbnail_T1w.jpg").write_bytes(thumb)
        (out / f"sub-{label}.html").write_text(f"<html><body>sub-{label}</body></html>")
        d = out / "logs" / f"sub-{label}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"run-{rec['run_uuid']}.json").write_text(json.dumps(rec, indent=2))
    return bids, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--keep", type=Path, help="keep the generated study in this folder")
    args = ap.parse_args(argv)
    os.environ.setdefault("NIPYPE_NO_ET", "1")
    sys.path.insert(0, str(REPO))
    tmp = Path(tempfile.mkdtemp(prefix="bench-group-"))
    root = args.keep or tmp
    try:
        t0 = time.monotonic()
        bids, out = make_study(root, args.n)
        t_gen = time.monotonic() - t0
        from bids_app.run import main as app_main

        t0 = time.monotonic()
        code = app_main([str(bids), str(out), "group"])
        t_inproc = time.monotonic() - t0
        exe = Path(sys.executable).parent / "synth7t"
        cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "bids_app.run"]
        t0 = time.monotonic()
        proc = subprocess.run(cmd + [str(bids), str(out), "group"], capture_output=True,
                              text=True, env=dict(os.environ, NIPYPE_NO_ET="1"))
        t_cli = time.monotonic() - t0
        for f in out.glob("sub-*/figures/*_desc-thumbnail_*.jpg"):
            f.unlink()  # outputs of older runs: thumbnails made from the figures
        t0 = time.monotonic()
        app_main([str(bids), str(out), "group"])
        t_old = time.monotonic() - t0
        rows = (out / "group_qc.tsv").read_text().splitlines()
        size = (out / "group.html").stat().st_size
        flagged = [r.split("\t")[0] for r in rows[1:] if "BrainVolumeML(" in r]
        print(f"\nbench_group: {platform.node()} {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs (load {os.getloadavg()[0]:.1f}), python "
              f"{platform.python_version()}")
        print(f"| {'step':44s} | {'seconds':>8s} |")
        print(f"|{'-' * 46}|{'-' * 10}|")
        print(f"| {'generate ' + str(args.n) + ' participants (not timed)':44s} | {t_gen:8.2f} |")
        print(f"| {'group level in-process (main([...group]))':44s} | {t_inproc:8.2f} |")
        print(f"| {'group level as a command (synth7t ... group)':44s} | {t_cli:8.2f} |")
        print(f"| {'same, no stored thumbnails (made from PNGs)':44s} | {t_old:8.2f} |")
        print(f"exit codes {code}/{proc.returncode}; {len(rows) - 1} rows; group.html "
              f"{size / 1e6:.2f} MB; brain-volume outliers: {', '.join(flagged) or 'none'}; "
              f"limit {LIMIT_S:g} s: {'PASS' if max(t_inproc, t_cli) <= LIMIT_S else 'FAIL'}")
        return 0 if code == 0 and proc.returncode == 0 and max(t_inproc, t_cli) <= LIMIT_S \
            else 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
