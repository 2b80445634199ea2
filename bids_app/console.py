"""Logging of the ``synth7t`` command: quiet console lines, a debug log file, one-line errors."""
from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

LOGGER = logging.getLogger("synth7t")


class _Formatter(logging.Formatter):
    def format(self, record):
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        return f"{stamp} | {level}{record.getMessage()}"


def setup_logging(verbose: int) -> None:
    """Quiet by default: our progress lines and Nipype warnings; more with each ``-v``."""
    LOGGER.setLevel(logging.DEBUG)
    LOGGER.propagate = False
    if not any(getattr(h, "_synth7t_console", False) for h in LOGGER.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._synth7t_console = True
        handler.setFormatter(_Formatter())
        LOGGER.addHandler(handler)
    for h in LOGGER.handlers:
        if getattr(h, "_synth7t_console", False):
            h.stream = sys.stderr  # the current stderr (tests replace it)
            h.setLevel(logging.DEBUG if verbose >= 1 else logging.INFO)


def setup_nipype_logging(verbose: int) -> None:
    """Nipype's loggers: interface warnings are summarised by the App; more from -v on."""
    from nipype import config as ncfg
    from nipype import logging as nlogging

    wf_level = "DEBUG" if verbose >= 3 else "INFO" if verbose >= 1 else "WARNING"
    other = ("DEBUG" if verbose >= 3 else "INFO" if verbose >= 2 else "WARNING" if verbose
             else "ERROR")
    ncfg.update_config({"logging": {"workflow_level": wf_level, "interface_level": other,
                                    "utils_level": other}})
    nlogging.update_logging(ncfg)


def add_file_log(log_dir: Path, run_uuid: str, stem: str = "synth7t") -> Path:
    path = Path(log_dir) / f"{stem}-{run_uuid}.log"
    handler = logging.FileHandler(path, delay=True)
    handler._synth7t_file = True
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    LOGGER.addHandler(handler)
    return path


def remove_file_logs() -> None:
    for h in [h for h in LOGGER.handlers if getattr(h, "_synth7t_file", False)]:
        LOGGER.removeHandler(h)
        h.close()


def error(message: str) -> None:
    """One error line on stderr (``synth7t: error: ...``), also into the log file."""
    prefix = "" if message.startswith(("synth7t: error:", "usage:")) else "synth7t: error: "
    print(prefix + message, file=sys.stderr, flush=True)
    record = LOGGER.makeRecord(LOGGER.name, logging.ERROR, __file__, 0, message, None, None)
    for h in LOGGER.handlers:
        if getattr(h, "_synth7t_file", False):
            h.handle(record)


def fmt_time(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"
