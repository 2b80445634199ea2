"""``synth7t-mrixfields``: the MRIxFields2026 Task 1 container entry point.

Usage (inside the container the defaults are right)::

    synth7t-mrixfields                       # reads $MANIFEST, writes $OUTPUT_DIR
    synth7t-mrixfields --check /output       # validate a submission folder against the manifest

Environment: ``INPUT_DIR`` (default ``/input``), ``OUTPUT_DIR`` (default ``/output``),
``MANIFEST`` (default ``$INPUT_DIR/manifest.json``), ``SYNTH7T_TMPDIR`` (temporary folder for
outputs before they are moved in; default the system temp folder, never inside ``OUTPUT_DIR``),
``SYNTH7T_MODEL_DIR`` / ``SYNTH7T_MODEL_NAME`` (defaults of ``--model-dir`` / ``--model-name``, so
an image derived from the synth7t image can bake in a trained model).

Exit codes: 0 all written (or ``--check`` passed), 1 some samples failed (or ``--check`` found
problems), 64 usage, 65 bad manifest / data, 66 manifest or an input missing, 73 cannot create the
output folder.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from synth7t import __version__
from synth7t import mrixfields as MX


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="synth7t-mrixfields",
        description="MRIxFields2026 Task 1: synthesise every manifest sample at 7T "
                    "(inputs already skull-stripped on the 0.5 mm grid).")
    p.add_argument("--input-dir", type=Path, default=None, help="default $INPUT_DIR or /input")
    p.add_argument("--output-dir", type=Path, default=None, help="default $OUTPUT_DIR or /output")
    p.add_argument("--manifest", type=Path, default=None,
                   help="default $MANIFEST or <input-dir>/manifest.json")
    p.add_argument("--model-dir", type=Path,
                   default=Path(os.environ["SYNTH7T_MODEL_DIR"])
                   if os.environ.get("SYNTH7T_MODEL_DIR") else None,
                   help="folder with a registry.json that overrides/extends the shipped models "
                        "(default $SYNTH7T_MODEL_DIR)")
    p.add_argument("--model-name", default=os.environ.get("SYNTH7T_MODEL_NAME") or "default",
                   help="registry model name to use (default $SYNTH7T_MODEL_NAME or 'default')")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"),
                   help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--batch-size", type=int, default=4, help="axial slices per forward pass")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help="left-right flip test-time augmentation (default: the shipped default, "
                        "synth7t.inference.DEFAULT_TTA)")
    p.add_argument("--uncertainty-dir", type=Path, default=None, metavar="DIR",
                   help="also write each sample's uncertainty map (expected absolute error) "
                        "into DIR, which must lie outside the output folder")
    p.add_argument("--tmp-dir", type=Path, default=None,
                   help="temporary folder for finished outputs before they are moved in "
                        "(default $SYNTH7T_TMPDIR or the system temp folder)")
    p.add_argument("--check", metavar="OUTPUT_DIR", type=Path, default=None,
                   help="only validate OUTPUT_DIR against the manifest (exit 0 valid, 1 not)")
    p.add_argument("--prepare-from", metavar="SPLIT_DIR", type=Path, default=None,
                   help="only lay out a test-phase input tree + manifest.json in --input-dir from "
                        "a dataset split (e.g. Validating_prospective) and exit")
    p.add_argument("--version", action="version", version=f"synth7t-mrixfields {__version__}")
    return p


def _err(msg: str) -> None:
    print(f"synth7t-mrixfields: {msg}", file=sys.stderr, flush=True)


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return MX.EX_USAGE if exc.code not in (0, None) else 0
    if args.threads is not None and args.threads < 1:
        _err("--threads must be >= 1")
        return MX.EX_USAGE
    input_dir = args.input_dir or Path(os.environ.get("INPUT_DIR", "/input"))
    output_dir = args.output_dir or Path(os.environ.get("OUTPUT_DIR", "/output"))
    manifest_path = args.manifest or Path(os.environ.get("MANIFEST") or input_dir / "manifest.json")

    if args.prepare_from is not None:
        if args.input_dir is None:
            _err("--prepare-from needs --input-dir (where the input tree is written)")
            return MX.EX_USAGE
        try:
            path = MX.prepare_input(args.prepare_from, args.input_dir)
        except MX.ManifestError as exc:
            for line in exc.problems:
                _err(line)
            return exc.code
        n = len(json.loads(path.read_text())["samples"])
        print(f"wrote {path} with {n} samples")
        return MX.EX_OK

    if args.check is not None:
        try:
            manifest = MX.load_manifest(manifest_path, input_dir, args.check, require_inputs=False)
        except MX.ManifestError as exc:
            for line in exc.problems:
                _err(line)
            return exc.code
        problems = MX.check_submission(manifest, args.check)
        for line in problems:
            print(f"INVALID: {line}")
        if problems:
            print(f"{len(problems)} problem(s); the submission in {args.check} is not valid")
            return MX.EX_FAILED
        print(f"OK: {args.check} holds exactly the {len(manifest.samples)} predictions of "
              f"{manifest_path}, all valid")
        return MX.EX_OK

    if not input_dir.is_dir():
        _err(f"input folder {input_dir} does not exist (set INPUT_DIR or --input-dir)")
        return MX.EX_NOINPUT
    try:
        manifest = MX.load_manifest(manifest_path, input_dir, output_dir)
    except MX.ManifestError as exc:
        for line in exc.problems:
            _err(line)
        _err(f"manifest rejected, nothing was written (exit {exc.code})")
        return exc.code
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(output_dir, os.W_OK):
            raise PermissionError(f"{output_dir} is not writable")
    except OSError as exc:
        _err(f"cannot create the output folder: {exc}")
        return MX.EX_CANTCREAT
    print(f"synth7t-mrixfields {__version__}: {len(manifest.samples)} samples from "
          f"{manifest_path} -> {output_dir}", file=sys.stderr, flush=True)
    try:
        result = MX.run(manifest, model_dir=args.model_dir, model_name=args.model_name,
                        device=args.device, threads=args.threads, batch_size=args.batch_size,
                        tta=args.tta, tmp_dir=args.tmp_dir,
                        uncertainty_dir=args.uncertainty_dir)
    except MX.ManifestError as exc:
        for line in exc.problems:
            _err(line)
        return exc.code
    except Exception as exc:  # registry / model problems found before any sample ran
        name = type(exc).__name__
        _err(f"{name}: {' '.join(str(exc).split())}")
        codes = {"RegistryError": MX.EX_NOINPUT, "ModelIntegrityError": MX.EX_DATAERR}
        _err("no prediction was written")
        return codes.get(name, MX.EX_FAILED)
    for line in result.failed:
        _err(f"FAILED {line}")
    print(f"wrote {len(result.written)} of {len(manifest.samples)} predictions in "
          f"{result.seconds / 60:.1f} min", file=sys.stderr, flush=True)
    return MX.EX_FAILED if result.failed else MX.EX_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
