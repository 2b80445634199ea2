"""Command-line interface of the ``synth7t`` BIDS App (fMRIPrep flag names and spellings)."""
from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from synth7t import __version__
from synth7t.fields import CONTRASTS

from .exitcodes import EX_BAD_ANALYSIS_LEVEL, EX_USAGE, Synth7tExit

ANALYSIS_LEVELS = ("participant", "group")
SKULL_STRIP_MODES = ("auto", "force", "skip")
BRAIN_EXTRACTION_METHODS = ("deep", "template")
DEVICES = ("auto", "cpu", "cuda")
OUTPUT_DTYPES = ("uint16", "int16", "float32")
_LABEL_RE = re.compile(r"^[A-Za-z0-9]+$")


class _Parser(argparse.ArgumentParser):
    """``argparse`` that raises :class:`Synth7tExit` (code 64) instead of exiting with 2."""

    def error(self, message):  # noqa: D401 - argparse API
        raise Synth7tExit(EX_USAGE, f"{self.format_usage().rstrip()}\n{self.prog}: error: {message}")

    def exit(self, status=0, message=None):
        # --help and --version end here: print and exit as argparse would.
        if message:
            self._print_message(message)
        raise SystemExit(status)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show a default only when there is one worth showing."""

    def _get_help_string(self, action):
        if action.default in (None, False, 0) and action.option_strings and \
                not isinstance(action.default, float):
            return action.help
        return super()._get_help_string(action)


def _label(prefix: str):
    """Type for BIDS labels: drops ``sub-``/``ses-`` and refuses anything but [A-Za-z0-9]."""

    what = {"sub-": "participant", "ses-": "session"}[prefix]

    def _check(raw: str) -> str:
        value = raw.strip()
        if value.startswith(prefix):
            value = value[len(prefix):]
        if not _LABEL_RE.match(value):
            # argparse turns ArgumentTypeError into parser.error -> exit 64
            raise argparse.ArgumentTypeError(
                f"invalid {what} label {raw!r}: BIDS labels are letters and digits only "
                f"(optionally prefixed with {prefix!r}; no path separators, dots, dashes, "
                "underscores or wildcards)"
            )
        return value

    _check.__name__ = f"{prefix.rstrip('-')} label"
    return _check


def _to_gb(value: str) -> float:
    """fMRIPrep's ``--mem`` parser: ``8G``, ``16000M``, ``16000`` (MB by default)."""
    scale = {"G": 1, "T": 10**3, "M": 1e-3, "K": 1e-6, "B": 1e-9}
    value = str(value).strip().upper()
    digits = "".join(c for c in value if c.isdigit() or c == ".")
    units = value[len(digits):].strip() or "M"
    if not digits or units[0] not in scale:
        raise argparse.ArgumentTypeError(f"cannot parse memory value {value!r} (e.g. 8G, 16000M)")
    return float(digits) * scale[units[0]]


def _existing_file(value: str) -> Path:
    path = Path(value).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"file not found: {value}")
    return path.absolute()


def _bids_filter(value: str) -> dict:
    """Load ``--bids-filter-file``; anything but a JSON object is a usage error (64)."""
    path = _existing_file(value)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"{path} is not a valid JSON file: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise argparse.ArgumentTypeError(
            f"{path}: expected a JSON object mapping query names (t1w, t2w, flair) to objects "
            "of BIDS entities"
        )
    unknown = sorted(set(k.lower() for k in data) - {c.lower() for c in CONTRASTS})
    if unknown:
        raise argparse.ArgumentTypeError(
            f"{path}: unknown query name(s) {unknown}; use t1w, t2w, flair"
        )
    return {k.lower(): v for k, v in data.items()}


def _field(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """Build the ``synth7t`` argument parser."""
    parser = _Parser(
        prog="synth7t",
        description=(
            f"synth7t v{__version__}: synthesise 7T-equivalent structural MRI (T1w, T2w, FLAIR) "
            "from 0.1/1.5/3/5 T scans of a BIDS dataset, and write a BIDS-Derivatives dataset."
        ),
        formatter_class=_Formatter,
    )
    parser.add_argument("bids_dir", type=Path, help="root folder of a valid BIDS dataset")
    parser.add_argument("output_dir", type=Path, help="output folder (BIDS-Derivatives)")
    # No ``choices`` here: a bad analysis level must exit with 17, not as a usage error.
    parser.add_argument("analysis_level",
                        help="'participant': process participants (one job each on a cluster); "
                             "'group': study table group_qc.tsv and page group.html from what "
                             "the participant runs left (nothing is recomputed)")
    parser.add_argument("--version", action="version", version=f"synth7t v{__version__}")

    g_bids = parser.add_argument_group("Options for filtering BIDS queries")
    g_bids.add_argument(
        "--participant-label", "--participant_label", dest="participant_label",
        nargs="+", type=_label("sub-"), metavar="LABEL",
        help="participant label(s) to process (the sub- prefix may be omitted); default: all",
    )
    g_bids.add_argument(
        "--session-label", "--session_label", dest="session_label",
        nargs="+", type=_label("ses-"), metavar="LABEL",
        help="session label(s) to process (the ses- prefix may be omitted); default: all",
    )
    g_bids.add_argument(
        "--bids-filter-file", "--bids_filter_file", dest="bids_filters", type=_bids_filter,
        metavar="FILE",
        help="JSON file with pybids filters per query, e.g. "
             '{"t1w": {"acquisition": "mprage"}, "flair": {"run": 1}}',
    )
    g_bids.add_argument(
        "--skip-bids-validation", "--skip_bids_validation", dest="skip_bids_validation",
        action="store_true", default=False,
        help="do not validate the input dataset with bids-validator-deno",
    )

    g_perf = parser.add_argument_group("Options to handle performance")
    g_perf.add_argument(
        "--nprocs", "--nthreads", "--n_cpus", "--n-cpus", dest="nprocs", type=int,
        metavar="N", help="maximum number of processes/threads across all nodes; default: all "
        "CPUs available to this process",
    )
    g_perf.add_argument(
        "--omp-nthreads", "--omp_nthreads", dest="omp_nthreads", type=int, metavar="N",
        help="threads per node (ITK, torch); default: min(nprocs, 8)",
    )
    g_perf.add_argument(
        "--mem", "--mem_mb", "--mem-mb", dest="memory_gb", type=_to_gb, metavar="MEMORY_MB",
        help="upper bound of memory for the Nipype scheduler (e.g. 8G, 16000M; MB by default)",
    )
    g_perf.add_argument(
        "--use-plugin", "--nipype-plugin-file", dest="use_plugin", type=_existing_file,
        metavar="FILE",
        help="Nipype plugin YAML file: 'plugin: <name>' and optional 'plugin_args: {...}' "
             "(MultiProc by default; SLURM/SGE/PBS for clusters)",
    )
    g_perf.add_argument(
        "-w", "--work-dir", dest="work_dir", type=Path, default=None,
        help="Nipype working directory (cache); default: ./work",
    )
    g_perf.add_argument(
        "--stop-on-first-crash", dest="stop_on_first_crash", action="store_true", default=False,
        help="stop the whole run at the first node that crashes",
    )
    g_perf.add_argument(
        "--random-seed", "--random_seed", dest="random_seed", type=int, default=0, metavar="N",
        help="seed for registration, skull stripping and synthesis, recorded in every sidecar "
             "(default: 0, so reruns are identical and reuse the cache)",
    )
    g_perf.add_argument(
        "--notrack", action="store_true", default=False,
        help="opt out of usage tracking (synth7t never tracks; kept for fMRIPrep compatibility)",
    )
    g_perf.add_argument(
        "-v", "--verbose", dest="verbose_count", action="count", default=0,
        help="more logging: -v node details, -vv Nipype info, -vvv debug",
    )

    g_app = parser.add_argument_group("synth7t options")
    g_app.add_argument(
        "--contrasts", nargs="+", choices=CONTRASTS, default=list(CONTRASTS), metavar="CONTRAST",
        help=f"contrasts to synthesise, among {', '.join(CONTRASTS)} (those present are used)",
    )
    g_app.add_argument(
        "--field-strength", "--field_strength", dest="field_strength", type=_field,
        metavar="TESLA",
        help="field strength of the inputs in tesla; overrides MagneticFieldStrength of the "
             "sidecars (required when the sidecars lack it)",
    )
    g_app.add_argument(
        "--skull-strip", "--skull_strip", dest="skull_strip", choices=SKULL_STRIP_MODES,
        default="auto",
        help="auto: detect already brain-extracted inputs and skull-strip the others; "
             "force: always skull-strip; skip: treat inputs as brain-extracted",
    )
    g_app.add_argument(
        "--brain-extraction", "--brain_extraction", dest="brain_extraction",
        choices=BRAIN_EXTRACTION_METHODS, default="deep",
        help="deep (default): deepbet 1.0.2 network (weights SHA-256-checked, any contrast, "
             "--device/--omp-nthreads as synthesis); template: Colin27 head registered to the "
             "subject, its brain mask warped back (no network; T1w-like input; cuts cortex on "
             "some real heads, see the README)",
    )
    g_app.add_argument(
        "--device", choices=DEVICES, default="auto",
        help="device for the synthesis networks and the deep brain extraction",
    )
    g_app.add_argument(
        "--model-dir", "--model_dir", dest="model_dir", type=Path, metavar="DIR",
        help="folder with a registry.json that overrides/extends the shipped models",
    )
    g_app.add_argument(
        "--output-dtype", "--output_dtype", dest="output_dtype", choices=OUTPUT_DTYPES,
        default="uint16",
        help="storage of reference-space images: scaled integers (uint16/int16 with scl_slope, "
             "~5x smaller) or float32",
    )
    g_app.add_argument(
        "--no-uncertainty", "--no_uncertainty", dest="uncertainty", action="store_false",
        help="do not write the per-voxel uncertainty maps (desc-uncertainty) beside the "
             "synthetic images",
    )
    g_app.add_argument(
        "--no-shrinkage", "--no_shrinkage", dest="shrinkage", action="store_false",
        help="write the network's output as it is, without the shrinkage toward the local mean "
             "where its uncertainty map explains the local variation (models whose config "
             "asks for it, e.g. the shipped default)",
    )
    g_app.add_argument(
        "--tta", dest="tta", action=argparse.BooleanOptionalAction, default=None,
        help="left-right test-time flips in synthesis (--no-tta turns them off; default: the "
             "shipped models' default)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line.

    Raises
    ------
    Synth7tExit
        Code 64 for usage errors, 17 for a bad analysis level.
    """
    opts = build_parser().parse_args(argv)
    if opts.analysis_level not in ANALYSIS_LEVELS:
        raise Synth7tExit(
            EX_BAD_ANALYSIS_LEVEL,
            f"analysis level {opts.analysis_level!r} is not supported; "
            f"use one of: {', '.join(ANALYSIS_LEVELS)}",
        )
    for name in ("nprocs", "omp_nthreads"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise Synth7tExit(EX_USAGE, f"--{name.replace('_', '-')} must be >= 1 (got {value})")
    if opts.memory_gb is not None and opts.memory_gb <= 0:
        raise Synth7tExit(EX_USAGE, "--mem must be positive")
    opts.bids_dir = opts.bids_dir.expanduser().absolute()
    opts.output_dir = opts.output_dir.expanduser().absolute()
    opts.work_dir = (opts.work_dir or Path(os.getcwd()) / "work").expanduser().absolute()
    if opts.model_dir is not None:
        opts.model_dir = opts.model_dir.expanduser().absolute()
    # keep the order given, drop duplicates
    opts.contrasts = list(dict.fromkeys(opts.contrasts))
    for name in ("participant_label", "session_label"):
        if getattr(opts, name):
            setattr(opts, name, list(dict.fromkeys(getattr(opts, name))))
    return opts
