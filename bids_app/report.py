"""Per-participant visual report (fMRIPrep style): ``<out_dir>/sub-<label>.html``.

The report is one HTML file with its figures beside it, in ``<out_dir>/sub-<label>/figures/``
(the NiPreps layout; add ``figures/`` to ``.bidsignore``). It needs no network: no CDN, no
web fonts, no scripts. Figures (PNG) are nilearn ``plot_anat`` mosaics (``display_mode``
``x``/``y``/``z``) with niworkflows' cut placement and window (``cuts_from_bbox``,
``robust_set_limits``): a mask contour over an image (``add_contours``) as in sMRIPrep's
brain-mask and normalisation reportlets, and the input next to its synthetic 7T image.
Images finer than 0.9 mm are block-averaged to ~1 mm for display (a mosaic shows ~1 mm per
pixel), which keeps a 0.5 mm report to seconds per contrast.

Call :func:`generate_report` once per participant after the graph ran (also after a partial
failure: a missing derivative is reported as missing, never raises).

``run_info`` schema
-------------------
Every key is optional except ``participant``; paths may be absolute or relative (derivative
paths relative to ``out_dir``, ``source`` relative to ``bids_dir``). Times are ISO 8601 strings
(``datetime.isoformat()``) or POSIX seconds (``time.time()``).

.. code-block:: python

    run_info = {
        "participant": "01",                 # label, with or without "sub-"
        "sessions": ["pre", "post"],         # [] or absent when the dataset has no sessions
        "bids_dir": "/data/bids", "output_dir": "/data/derivatives/synth7t",
        "work_dir": "/scratch/work",
        "command": ["synth7t", "/data/bids", "..."],   # argv list or one string
        "options": {"random_seed": 0, "nprocs": 2, ...},  # anything worth showing (flat dict)
        "start_time": "2026-11-25T17:00:00+00:00",
        "end_time": "2026-11-25T17:04:10+00:00",
        "elapsed_seconds": 250.0,            # used when the times are missing
        "status": "ok",                      # ok | partial | crashed | refused
        "executed_nodes": ["anat_preproc_t1w_wf/n4", ...],  # nodes not reused from the cache
        "log_file": "/data/derivatives/synth7t/logs/synth7t-<run>.log", "run_uuid": "...",
        "versions": {"synth7t": "0.1.0", "nipype": "1.11.0", ...},  # missing ones filled in
        "reference": {"space": "MRIxFields",
                      "template": "/path/tpl_T1w.nii.gz",       # optional
                      "mask": "/path/tpl_desc-brain_mask.nii.gz"},  # template brain mask;
                                                                  # default: shipped one, else
                                                                  # nilearn's MNI152 mask
        "warnings": ["..."],                 # run-level warnings (strings)
        "errors": ["..."],                   # run-level errors, e.g. an input refused (exit 65)
        "inputs": [                          # one entry per input image (contrast x session)
            {
                "contrast": "T1w",           # T1w | T2w | FLAIR
                "session": None,             # label or None
                "source": "sub-01/anat/sub-01_T1w.nii.gz",
                "field": {"raw": 2.89, "bin": 3.0, "source": "sidecar",  # FieldRouting.as_dict()
                          "passthrough": False},
                "model": {...},              # ModelEntry.provenance(): Name, Kind, Version,
                                             # SHA256, File, Description, TrainingData, Metrics
                "model_card": "/path/card.json",  # optional; its "Metrics" are shown too
                "warnings": ["header: qform and sform disagree; ..."],  # conform() warnings etc.
                "error": None,               # one line if this input failed
                "derivatives": {             # any subset; missing files are reported as such
                    "preproc": "sub-01/anat/sub-01_desc-preproc_T1w.nii.gz",
                    "mask": "sub-01/anat/sub-01_desc-brain_mask.nii.gz",
                    "ref_preproc": "sub-01/anat/sub-01_space-MRIxFields_desc-preproc_T1w.nii.gz",
                    "ref_mask": "...space-MRIxFields_desc-brain_mask.nii.gz",  # optional
                    "synth": "sub-01/anat/sub-01_space-MRIxFields_desc-synth7T_T1w.nii.gz",
                    "synth_native": "sub-01/anat/sub-01_desc-synth7T_T1w.nii.gz",
                    "xfm": "..._from-T1w_to-MRIxFields_mode-image_xfm.h5",
                    "xfm_inverse": "..._from-MRIxFields_to-T1w_mode-image_xfm.h5",
                    # reportlets the graph drew (workflows.reportlets): linked, not redrawn
                    "report_brain": "sub-01/figures/sub-01_desc-brain_T1w.png",
                    "report_reg": "sub-01/figures/sub-01_space-MRIxFields_desc-reg_T1w.png",
                },
            },
        ],
    }
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import os
import platform
import tempfile
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from synth7t.io import atomic_write_text

#: Packages whose versions the summary lists when ``run_info["versions"]`` does not.
VERSION_PACKAGES = ("synth7t", "nipype", "niworkflows", "nibabel", "antspyx", "torch", "numpy",
                    "nilearn", "pybids")
from workflows.reportlets import (  # noqa: F401 - shared with the graph's reportlet nodes
    DISPLAY_MIN_ZOOM, DPI, MOSAICS, N_CUTS, _cuts, _draw_uncertainty, _fig_contour, _fig_mosaic,
    _halve, _Images, _load3d, _on_voxel_axes, _window_pair,
    template_brain_mask)

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;color:#222;
     background:#fff}
nav{position:sticky;top:0;background:#24292e;padding:.5em 1em;z-index:2}
nav a{color:#fff;margin-right:1.5em;text-decoration:none;font-weight:600}
main{padding:0 1.5em 3em;max-width:1400px}
h1{font-size:1.6em;margin-top:1em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{margin-top:1.5em;color:#333}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em;
     text-align:left;vertical-align:top;font-size:.92em} th{background:#f6f8fa}
code{font-size:.9em;word-break:break-all}
img.reportlet{width:100%;max-width:1300px;display:block;background:#000;margin:.3em 0}
.warn{background:#fff8e1;border-left:4px solid #f0ad4e;padding:.4em .8em;margin:.3em 0}
.err{background:#fdecea;border-left:4px solid #d9534f;padding:.4em .8em;margin:.3em 0}
.ok{color:#2e7d32} .elem-desc{color:#555;font-size:.92em;margin:.2em 0 .5em}
.missing{color:#999;font-style:italic}
"""


# --------------------------------------------------------------------------- small helpers
def _get(d: dict | None, *keys: str, default: Any = None) -> Any:
    """First present key of ``d``, matched case-insensitively (``sha256`` == ``SHA256``)."""
    if not isinstance(d, dict):
        return default
    lower = {str(k).lower(): v for k, v in d.items()}
    for key in keys:
        if key.lower() in lower and lower[key.lower()] is not None:
            return lower[key.lower()]
    return default


def _parse_time(value: Any) -> _dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, _dt.datetime):
        return value
    if isinstance(value, (int, float)):
        return _dt.datetime.fromtimestamp(float(value), tz=_dt.timezone.utc)
    try:
        return _dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None


def _fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s"


def _versions(given: dict | None) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in VERSION_PACKAGES:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    out.update({str(k): str(v) for k, v in (given or {}).items()})
    return out


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(rows: list[tuple[str, Any]], *, raw: bool = False) -> str:
    cells = "".join(f"<tr><th>{_esc(k)}</th><td>{v if raw else _esc(v)}</td></tr>"
                    for k, v in rows)
    return f"<table>{cells}</table>"


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dict -> [("a / b", value)] for tables of model-card metrics."""
    if not isinstance(d, dict):
        return [(prefix or "value", d)]
    rows: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix} / {k}" if prefix else str(k)
        if isinstance(v, dict):
            rows.extend(_flatten(v, key))
        elif isinstance(v, float):
            rows.append((key, f"{v:.4g}"))
        else:
            rows.append((key, v))
    return rows


def _entities(participant: str, session: str | None) -> str:
    return f"sub-{participant}" + (f"_ses-{session}" if session else "")


# --------------------------------------------------------------------------- figures
def _reference_mask(run_info: dict, scratch: Path) -> tuple[str, str]:
    """Path and description of the reference template brain mask.

    From ``run_info["reference"]["mask"]``, else the shipped TemplateFlow folder, else nilearn's
    MNI152 mask (written to ``scratch``).
    """
    given = _get(run_info.get("reference"), "mask")
    if given and Path(given).is_file():
        return str(given), Path(given).name
    try:
        shipped = template_brain_mask()
        if shipped:
            return shipped, Path(shipped).name
    except Exception:  # noqa: BLE001 - the report must never fail on a missing template
        pass
    from nilearn.datasets import load_mni152_brain_mask

    path = scratch / "mni152_brain_mask.nii.gz"
    load_mni152_brain_mask(resolution=1).to_filename(path)
    return str(path), "nilearn MNI152 (ICBM 2009a) brain mask"


def _uncertainty_paths(paths: dict) -> tuple[Path | None, dict]:
    """The reference-grid uncertainty map beside the synthetic image, and the synthetic
    image's sidecar (which holds the uncertainty summary)."""
    syn = paths.get("synth")
    if not syn:
        return None, {}
    unc = syn.parent / syn.name.replace("_desc-synth7T_", "_desc-uncertainty_")
    side = syn.parent / (syn.name.split(".", 1)[0] + ".json")
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError):
        meta = {}
    return (unc if unc.is_file() else None), meta


def uncertainty_warning(contrast: str, meta: dict) -> str | None:
    """Summary warning when too much of the brain is uncertain (input out of distribution)."""
    from synth7t.uncertainty import OOD_SHARE, REFERENCE_QUANTILE

    # maps written before the per-pair threshold carry only the fixed one
    share = meta.get("UncertainShareAboveOODThreshold", meta.get("UncertainShareBrain"))
    limit = meta.get("UncertaintyOODThreshold", meta.get("UncertaintyThreshold"))
    if share is None or not meta.get("UncertaintyOutOfDistribution"):
        return None
    normal = (f"a normal brain: <= {100 * (1 - REFERENCE_QUANTILE):.0f} %; "
              if "UncertaintyOODThreshold" in meta else "")
    return (f"{contrast}: {100 * share:.0f} % of the brain has an expected error above "
            f"{limit} ({normal}limit {100 * OOD_SHARE:.0f} %): the input is "
            "probably unlike the training data; check the synthetic image against the input")


# --------------------------------------------------------------------------- sections

def _protocol_text(protocol: dict | None) -> str:
    """``TR 2250 ms, TE 4.11 ms, TI 925 ms, FA 9 deg`` (run record ``inputs[].protocol``)."""
    from synth7t.io import PROTOCOL_UNITS

    if not protocol:
        return "not stated"
    return ", ".join(f"{k} {v:g} {PROTOCOL_UNITS[k]}" for k, v in protocol.items()
                     if k in PROTOCOL_UNITS)


def _summary(run_info: dict, participant: str, versions: dict, warnings: list[str]) -> str:
    start, end = _parse_time(run_info.get("start_time")), _parse_time(run_info.get("end_time"))
    runtime = "unknown"
    if start and end:
        try:
            runtime = _fmt_duration((end - start).total_seconds())
        except TypeError:  # naive vs aware
            runtime = _fmt_duration((end.replace(tzinfo=None) - start.replace(tzinfo=None))
                                    .total_seconds())
    inputs = run_info.get("inputs") or []
    sessions = run_info.get("sessions") or sorted({i.get("session") for i in inputs
                                                   if i.get("session")})
    rows = [("Participant", f"sub-{participant}"),
            ("Sessions", ", ".join(map(str, sessions)) if sessions else "none (single session)"),
            ("Inputs found", f"{len(inputs)}: " + ", ".join(
                f"{i.get('contrast', '?')}" + (f" (ses-{i['session']})" if i.get("session") else "")
                for i in inputs) if inputs else "none")]
    ref = run_info.get("reference") or {}
    rows.append(("Reference space", _get(ref, "space", default="MRIxFields")
                 + " (0.5 mm, 364 x 436 x 364)"))
    if run_info.get("bids_dir"):
        rows.append(("BIDS dataset", run_info["bids_dir"]))
    if run_info.get("output_dir"):
        rows.append(("Output folder", run_info["output_dir"]))
    cmd = run_info.get("command")
    if cmd:
        rows.append(("Command", " ".join(map(str, cmd)) if isinstance(cmd, (list, tuple)) else cmd))
    for key, val in (run_info.get("options") or {}).items():
        rows.append((f"Option {key}", val))
    if runtime == "unknown" and isinstance(run_info.get("elapsed_seconds"), (int, float)):
        runtime = _fmt_duration(run_info["elapsed_seconds"])
    rows += [("Started", start.isoformat(timespec="seconds") if start else "unknown"),
             ("Finished", end.isoformat(timespec="seconds") if end else "unknown"),
             ("Run time", runtime)]
    if run_info.get("status"):
        rows.insert(1, ("Status", run_info["status"]))
    if isinstance(run_info.get("executed_nodes"), list):
        rows.append(("Nodes run by this run", f"{len(run_info['executed_nodes'])} (the others "
                     "were reused from the work directory, if any)"))
    for key, label in (("log_file", "Log"), ("run_uuid", "Run id")):
        if run_info.get(key):
            rows.append((label, run_info[key]))
    out = ['<h2 id="summary">Summary</h2>', _table(rows)]

    model_rows = []
    for item in inputs:
        model = item.get("model") or {}
        field = item.get("field") or {}
        raw, fbin = _get(field, "raw"), _get(field, "bin")
        kind = str(_get(model, "kind", default="?"))
        model_rows.append(
            "<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in (
                item.get("contrast", "?") + (f" ses-{item['session']}" if item.get("session")
                                             else ""),
                "missing" if raw is None else f"{raw:g} T" if isinstance(raw, (int, float))
                else raw,
                "?" if fbin is None else (f"{fbin:g} T" if isinstance(fbin, (int, float))
                                          else fbin),
                _get(field, "source", default="?")
                + (" (7 T pass-through)" if _get(field, "passthrough") else ""),
                _protocol_text(item.get("protocol")),
                _get(model, "name", default="none"), _get(model, "version", default="?"),
                "yes" if kind == "baseline" or _get(model, "baseline") else "no",
            )) + f"<td><code>{_esc(_get(model, 'sha256', default='?'))}</code></td></tr>")
    if model_rows:
        out.append("<h3>Field routing and models</h3><table><tr><th>Input</th>"
                   "<th>Field (raw)</th><th>Bin</th><th>From</th><th>Protocol (sidecar)</th>"
                   "<th>Model</th><th>Version</th>"
                   "<th>Baseline</th><th>SHA-256</th></tr>" + "".join(model_rows) + "</table>")
    out.append("<h3>Software</h3>" + _table(sorted(versions.items())))
    out.append('<h3 id="warnings">Warnings and errors</h3>')
    errors = list(run_info.get("errors") or []) + [
        f"{i.get('contrast')}: {i['error']}" for i in inputs if i.get("error")]
    for e in errors:
        out.append(f'<div class="err">{_esc(e)}</div>')
    for w in warnings:
        out.append(f'<div class="warn">{_esc(w)}</div>')
    if not errors and not warnings:
        out.append('<p class="ok">None.</p>')
    return "\n".join(out)


def _resolve(base: Path | None, value: Any) -> Path | None:
    if not value:
        return None
    p = Path(value)
    if not p.is_absolute() and base is not None:
        p = base / p
    return p if p.is_file() else None


def _img_tag(out_dir: Path, path: Path, alt: str) -> str:
    rel = path.relative_to(out_dir).as_posix()
    return f'<img class="reportlet" src="{_esc(rel)}" alt="{_esc(alt)}">'


def _brain_extraction_line(mask_path: Path) -> str:
    """HTML line naming the brain-extraction engine, version and weights SHA-256, from the
    mask's sidecar (``BrainExtraction``); empty when the sidecar does not say."""
    try:
        meta = json.loads(Path(str(mask_path).rsplit(".nii", 1)[0] + ".json").read_text())
    except (OSError, ValueError):
        return ""
    bet = meta.get("BrainExtraction")
    if not isinstance(bet, dict):
        return ""
    if bet.get("Method") == "deep":
        weights = ", ".join(f"<code>{_esc(k)}</code> SHA-256 <code>{_esc(str(v)[:16])}...</code>"
                            for k, v in (bet.get("Weights") or {}).items())
        return (f"Brain extraction: {_esc(bet.get('Engine'))} {_esc(bet.get('Version'))} "
                f"(deep network; {weights}).")
    return f"Brain extraction: {_esc(bet.get('Method'))} ({_esc(bet.get('Description', ''))})."


def _drawn(path: Path | None) -> bool:
    """Whether a reportlet the graph drew is there to link (an empty file is not)."""
    try:
        return path is not None and path.is_file() and path.stat().st_size > 0
    except OSError:
        return False


def _input_section(item: dict, idx: int, participant: str, out_dir: Path, fig_dir: Path,
                   ref_mask, ref_mask_name: str, fig_log: list[str], images: "_Images") -> str:
    contrast = str(item.get("contrast", "image"))
    session = item.get("session")
    ent = _entities(participant, session)
    title = contrast + (f" (ses-{session})" if session else "")
    anchor = f"input-{idx}"
    der = item.get("derivatives") or {}
    paths = {k: _resolve(out_dir, v) for k, v in der.items()}
    out = [f'<h2 id="{anchor}">{_esc(title)}</h2>']
    if item.get("source"):
        out.append(f'<p class="elem-desc">Source: <code>{_esc(item["source"])}</code></p>')
    for w in item.get("warnings") or []:
        out.append(f'<div class="warn">{_esc(w)}</div>')
    if item.get("error"):
        out.append(f'<div class="err">{_esc(item["error"])}</div>')

    def attempt(label: str, fn, *args) -> bool:
        try:
            fn(*args)
            return True
        except Exception as exc:  # noqa: BLE001 - one broken figure must not lose the report
            fig_log.append(f"{title}: figure '{label}' failed: {type(exc).__name__}: {exc}")
            out.append(f'<p class="missing">{_esc(label)}: figure failed ({_esc(exc)})</p>')
            return False

    # 1. brain mask over the input
    out.append("<h3>Brain mask</h3>")
    if paths.get("preproc") and paths.get("mask"):
        f = fig_dir / f"{ent}_desc-brain_{contrast}.png"
        out.append('<p class="elem-desc">Brain mask (red contour) over the preprocessed input '
                   "(conformed, bias-corrected), native space.</p>")
        bet = _brain_extraction_line(paths["mask"])
        if bet:
            out.append(f'<p class="elem-desc">{bet}</p>')
        if _drawn(paths.get("report_brain")):  # the graph's reportlet (workflows.reportlets)
            out.append(_img_tag(out_dir, paths["report_brain"], f"{title} brain mask"))
        elif attempt("brain mask", lambda: _fig_contour(
                images.get(paths["preproc"]), images.get(paths["mask"], mask=True), f)):
            out.append(_img_tag(out_dir, f, f"{title} brain mask"))
    else:
        out.append('<p class="missing">Not available (preproc or mask derivative missing).</p>')

    # 2. registration to the reference
    out.append("<h3>Registration to the 7T reference space</h3>")
    if paths.get("ref_preproc") and ref_mask:
        f = fig_dir / f"{ent}_space-MRIxFields_desc-reg_{contrast}.png"
        out.append('<p class="elem-desc">The input resampled into the reference space, with '
                   f"the reference template's brain mask as a red contour ({_esc(ref_mask_name)})."
                   "</p>")
        if _drawn(paths.get("report_reg")):
            out.append(_img_tag(out_dir, paths["report_reg"], f"{title} registration"))
        elif attempt("registration", lambda: _fig_contour(
                images.get(paths["ref_preproc"]), images.get(ref_mask, mask=True), f)):
            out.append(_img_tag(out_dir, f, f"{title} registration"))
    else:
        out.append('<p class="missing">Not available (reference-space image missing).</p>')

    # 3. input next to synthetic 7T
    out.append("<h3>Input and synthetic 7T image</h3>")
    inp = paths.get("ref_preproc") or paths.get("preproc")
    syn = paths.get("synth") if paths.get("ref_preproc") else paths.get("synth_native")
    syn = syn or paths.get("synth") or paths.get("synth_native")
    mosaics = {name: paths.get(f"report_{name}") for _, name in MOSAICS}
    if all(_drawn(p) for p in mosaics.values()):  # the graph's reportlets
        out.append('<p class="elem-desc">Top row: the input (registered to the reference); '
                   "bottom row: the synthetic 7T image at the same positions. Both on one "
                   "window: 0 to the 99.8th percentile inside the brain.</p>")
        for name, path in mosaics.items():
            out.append(_img_tag(out_dir, path, f"{title} {name} mosaic"))
    elif inp:
        space_mask = paths.get("ref_mask") if paths.get("ref_preproc") else paths.get("mask")
        try:
            in_img = images.get(inp)
            syn_img = images.get(syn) if syn else None
            if syn_img is not None and syn_img.shape != in_img.shape:
                from nilearn.image import resample_to_img

                syn_img = resample_to_img(syn_img, in_img, interpolation="linear",
                                          force_resample=True, copy_header=True)
            mask_img = images.get(space_mask, mask=True) if space_mask else None
            if mask_img is None and syn_img is not None:
                import nibabel as nb

                mask_img = nb.Nifti1Image((np.asanyarray(syn_img.dataobj) > 0).astype(np.uint8),
                                          syn_img.affine)
            a, b = _window_pair(in_img, syn_img, mask_img)
            bbox = mask_img if mask_img is not None and np.any(np.asanyarray(mask_img.dataobj)) \
                else a
            cuts = _cuts(bbox)
        except Exception as exc:  # noqa: BLE001
            fig_log.append(f"{title}: mosaics failed: {type(exc).__name__}: {exc}")
            out.append(f'<p class="missing">Mosaics failed ({_esc(exc)})</p>')
        else:
            out.append('<p class="elem-desc">Top row: the input ('
                       + ("registered to the reference" if paths.get("ref_preproc") else "native")
                       + "); bottom row: the synthetic 7T image at the same positions. Both on "
                       "one window: 0 to the 99.8th percentile inside the brain.</p>")
            if syn_img is None:
                out.append('<p class="missing">Synthetic image not available.</p>')
            for axis, name in MOSAICS:
                f = fig_dir / f"{ent}_desc-synth7T{name}_{contrast}.png"
                if attempt(f"{name} mosaic", _fig_mosaic, a, b, cuts, axis, f,
                           (f"input {contrast} ({name})", f"synthetic 7T ({name})")):
                    out.append(_img_tag(out_dir, f, f"{title} {name} mosaic"))
    else:
        out.append('<p class="missing">Not available (preprocessed input missing).</p>')

    # 4. uncertainty
    unc_path, syn_meta = _uncertainty_paths(paths)
    if unc_path is not None or "UncertaintyMeanBrain" in syn_meta:
        out.append("<h3>Uncertainty</h3>")
        if "UncertaintyMeanBrain" in syn_meta:
            out.append(_table([
                ("Mean expected absolute error in the brain", syn_meta["UncertaintyMeanBrain"]),
                ("95th percentile", syn_meta.get("UncertaintyP95Brain")),
                (f"Share of the brain above {syn_meta.get('UncertaintyThreshold')}",
                 f"{100 * float(syn_meta.get('UncertainShareBrain', 0)):.1f} %"),
                ("Method", syn_meta.get("UncertaintyMethod"))]))
            w = uncertainty_warning(contrast, syn_meta)
            if w:
                out.append(f'<div class="warn">{_esc(w)}</div>')
        if unc_path is not None and paths.get("synth"):
            f = fig_dir / f"{ent}_desc-uncertainty_{contrast}.png"
            out.append('<p class="elem-desc">The synthetic 7T image with its per-voxel '
                       "uncertainty (expected absolute error, in the image's [0, 1] units) as a "
                       "heat overlay; bright = do not trust the detail there.</p>")

            axial = paths.get("report_axial")
            graph_fig = axial.with_name(axial.name.replace("_desc-synth7Taxial_",
                                                           "_desc-uncertainty_")) if axial else None
            if _drawn(graph_fig):  # the graph's reportlet
                out.append(_img_tag(out_dir, graph_fig, f"{title} uncertainty"))
            elif attempt("uncertainty", _draw_uncertainty, images, paths["synth"], unc_path, f):
                out.append(_img_tag(out_dir, f, f"{title} uncertainty"))

    # 5. model card
    model = item.get("model") or {}
    out.append("<h3>Synthesis model</h3>")
    if model:
        rows = [(k, _get(model, k)) for k in ("Name", "Kind", "Version", "SHA256", "File",
                                              "Description", "TrainingData")
                if _get(model, k) is not None]
        out.append(_table([(k, v if not isinstance(v, (dict, list)) else json.dumps(v))
                           for k, v in rows]))
        metrics = _get(model, "metrics")
        card = _resolve(None, item.get("model_card"))
        if not metrics and card:
            try:
                metrics = _get(json.loads(card.read_text()), "metrics", "validation")
            except (OSError, ValueError):
                metrics = None
        out.append("<h4>Validation (model card)</h4>")
        out.append(_table(_flatten(metrics)) if metrics else
                   '<p class="missing">The model card lists no validation metrics.</p>')
    else:
        out.append('<p class="missing">No model information.</p>')
    return "\n".join(out)


# --------------------------------------------------------------------------- entry point
def generate_report(out_dir: str | os.PathLike, participant_label: str, run_info: dict) -> Path:
    """Write ``<out_dir>/sub-<label>.html`` and its figures; return the HTML path.

    Never raises for a missing or unreadable derivative (the figure is reported as missing);
    raises ``OSError`` only if the report itself cannot be written. Files are written
    atomically (temp file + ``os.replace``), so concurrent runs on other participants and an
    interrupted run never leave a half-written report under its final name.
    """
    t0 = time.monotonic()
    out_dir = Path(out_dir).absolute()
    participant = str(participant_label)
    participant = participant[4:] if participant.startswith("sub-") else participant
    run_info = dict(run_info or {})
    fig_dir = out_dir / f"sub-{participant}" / "figures"  # made by the first figure written
    versions = _versions(run_info.get("versions"))

    fig_log: list[str] = []
    ref_mask, ref_mask_name = None, ""
    inputs = run_info.get("inputs") or []
    scratch = tempfile.TemporaryDirectory(prefix="synth7t-report-")
    if any((i.get("derivatives") or {}).get("ref_preproc") for i in inputs):
        try:
            ref_mask, ref_mask_name = _reference_mask(run_info, Path(scratch.name))
        except Exception as exc:  # noqa: BLE001
            fig_log.append(f"reference template mask unavailable: {exc}")

    try:
        images = _Images(Path(scratch.name))
        sections = [_input_section(item, i, participant, out_dir, fig_dir, ref_mask,
                                   ref_mask_name, fig_log, images) for i, item in enumerate(inputs)]
    finally:
        scratch.cleanup()
    warnings = [str(w) for w in run_info.get("warnings") or []]
    warnings += [f"{i.get('contrast', '?')}"
                 + (f" (ses-{i['session']})" if i.get("session") else "") + f": {w}"
                 for i in inputs for w in (i.get("warnings") or [])]
    warnings += fig_log
    for item in inputs:
        syn = (item.get("derivatives") or {}).get("synth")
        meta = _uncertainty_paths({"synth": _resolve(out_dir, syn)})[1] if syn else {}
        w = uncertainty_warning(str(item.get("contrast", "?")), meta)
        if w:
            warnings.append(w)
    summary = _summary(run_info, participant, versions, warnings)

    nav = ['<a href="#summary">Summary</a>'] + [
        f'<a href="#input-{i}">{_esc(item.get("contrast", "?"))}'
        + (f" ses-{_esc(item['session'])}" if item.get("session") else "") + "</a>"
        for i, item in enumerate(inputs)] + ['<a href="#about">About</a>']
    about = (f'<h2 id="about">About</h2><p>Report generated by synth7t '
             f'{_esc(versions.get("synth7t", "?"))} on '
             f"{_esc(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds'))} "
             f"in {time.monotonic() - t0:.1f} s. Figures: niworkflows reportlets and nilearn.</p>")
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>synth7t: sub-{_esc(participant)}</title><style>{_CSS}</style></head>
<body><nav>{''.join(nav)}</nav><main>
<h1>synth7t report: sub-{_esc(participant)}</h1>
{summary}
{''.join(sections)}
{about}
</main></body></html>
"""
    out_file = out_dir / f"sub-{participant}.html"
    atomic_write_text(doc, out_file)
    return out_file
