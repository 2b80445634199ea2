"""Container recipes: what can be checked without building an image (seconds).

The image itself is built and run in tests/test_image.py (podman). Here:

* Singularity.def has the required header and sections, runs the BIDS App, self-tests, documents
  an ``apptainer run --cleanenv -B`` example and copies only files that exist.
* Dockerfile, Singularity.def and .ci/run all install through scripts/install.sh (the one path).
* The Dockerfile verifies the model SHA-256s before the install; scripts/build_image.sh is valid
  shell, and no recipe names a path of the build machine.
"""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQUIRED_SECTIONS = ("labels", "help", "files", "post", "environment", "runscript", "test")
REQUIRED_ENV = ("TEMPLATEFLOW_AUTOUPDATE=0", "NIPYPE_NO_ET=1", "PYTHONNOUSERSITE=1",
                "TEMPLATEFLOW_HOME=")


def parse_def(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """Split a definition file into header keywords and ``%section`` bodies."""
    header, sections, current = {}, {}, None
    for line in text.splitlines():
        m = re.match(r"^%(\w+)(?:\s+(\S+))?\s*$", line)
        if m:
            current = m.group(1) + (f" {m.group(2)}" if m.group(2) else "")
            sections[current] = ""
            continue
        if current is None:
            hm = re.match(r"^(\w+):\s*(.+?)\s*$", line)
            if hm:
                header[hm.group(1)] = hm.group(2)
        else:
            sections[current] += line + "\n"
    return header, sections


@pytest.fixture(scope="module")
def sdef():
    return parse_def((REPO / "Singularity.def").read_text())


def test_singularity_header(sdef):
    header, _ = sdef
    assert header.get("Bootstrap") == "docker"
    assert re.match(r"^python:3\.11[\w.-]*-slim", header.get("From", "")), header


def test_singularity_sections(sdef):
    _, sec = sdef
    for name in REQUIRED_SECTIONS:
        assert name in sec and sec[name].strip(), f"%{name} missing or empty"
    assert re.search(r'exec\s+synth7t\s+"\$@"', sec["runscript"]), sec["runscript"]
    assert re.search(r"^\s*synth7t --version\s*$", sec["test"], re.M)
    assert "synth7t-mrixfields --version" in sec["test"]
    for var in REQUIRED_ENV:
        assert var in sec["environment"], var
    tf = re.search(r"TEMPLATEFLOW_HOME=(\S+)", sec["environment"]).group(1)
    assert tf.endswith("synth7t/data/templateflow")
    help_text = " ".join(sec["help"].replace("\\\n", " ").split())
    assert re.search(r"apptainer run --cleanenv( -B \S+)+ \S+\.sif \S+ \S+ participant", help_text), \
        help_text
    assert "org.opencontainers.image.version" in sec["labels"]


def test_singularity_files_exist_and_cover_the_install(sdef):
    _, sec = sdef
    sources = [shlex.split(line)[0] for line in sec["files"].splitlines() if line.strip()]
    for src in sources:
        assert (REPO / src).exists(), f"%files copies {src}, which does not exist"
    for needed in ("setup.cfg", "pyproject.toml", "scripts", "synth7t", "workflows", "bids_app",
                   "README.md"):
        assert needed in sources, f"%files lacks {needed} (needed by scripts/install.sh)"


def test_singularity_scripts_are_valid_shell(sdef, tmp_path):
    _, sec = sdef
    for name in ("post", "environment", "runscript", "test"):
        script = tmp_path / f"{name}.sh"
        script.write_text(sec[name])
        proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert proc.returncode == 0, f"%{name}: {proc.stderr}"


def _calls_install(text: str) -> bool:
    return re.search(r"(^|[\s;&|(])(bash\s+)?(\./)?scripts/install\.sh\b", text, re.M) is not None


def test_singularity_post_runs_install_sh(sdef):
    _, sec = sdef
    assert _calls_install(sec["post"]), sec["post"]


def test_dockerfile():
    text = (REPO / "Dockerfile").read_text()
    runs = " ".join(m.group(1) for m in re.finditer(r"^RUN\s+((?:.*\\\n)*.*)$", text, re.M))
    assert _calls_install(runs), "no RUN line calls scripts/install.sh"
    # ARG BASE_IMAGE before FROM ${BASE_IMAGE}, CPU default
    arg = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    frm = re.search(r"^FROM\s+\$\{?BASE_IMAGE\}?", text, re.M)
    assert arg and frm and arg.start() < frm.start()
    assert "python:3.11" in arg.group(1)
    env = " ".join(m.group(1) for m in re.finditer(r"^ENV\s+((?:.*\\\n)*.*)$", text, re.M))
    for var in REQUIRED_ENV:
        assert var in env, var
    assert re.search(r"TEMPLATEFLOW_HOME=\S*synth7t/data/templateflow", env)
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert re.search(r'^ENTRYPOINT\s+\["synth7t-mrixfields"\]', text, re.M)
    assert "docker run" in text and "--entrypoint synth7t" in text  # documented run lines
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for s in src.split():
            assert (REPO / s.rstrip("/")).exists(), f"COPY {s}: does not exist"


def _make_vars(text: str) -> dict[str, str]:
    out = {}
    for m in re.finditer(r"^([A-Za-z_][\w]*)\s*(?:\?=|:=|=)\s*(.*)$", text, re.M):
        out.setdefault(m.group(1), m.group(2).strip())
    return out


def _make_rules(text: str) -> dict[str, tuple[list[str], str]]:
    """``target -> (prerequisites, recipe)`` with simple ``$(VAR)`` expansion."""
    vars_ = _make_vars(text)

    def expand(s: str) -> str:
        for _ in range(5):
            s = re.sub(r"\$\((\w+)\)", lambda m: vars_.get(m.group(1), ""), s)
        return s

    rules: dict[str, tuple[list[str], str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("\t") and current:
            for t in current:
                rules[t] = (rules[t][0], rules[t][1] + expand(line) + "\n")
            continue
        m = re.match(r"^([^\s:=#][^:=]*?):(?!=)\s*(.*)$", line)
        if m and not line.startswith("."):
            targets = expand(m.group(1)).split()
            prereqs = expand(m.group(2)).split()
            for t in targets:
                rules[t] = (prereqs, "")
            current = targets
        elif not line.strip() or not line.startswith("\t"):
            current = None if not line.strip() else current
    return rules


def _make_target_installs(rules, target, seen=None) -> bool:
    seen = seen or set()
    if target in seen or target not in rules:
        return False
    seen.add(target)
    prereqs, recipe = rules[target]
    return _calls_install(recipe) or any(_make_target_installs(rules, p, seen) for p in prereqs)


def test_ci_run_installs_through_install_sh():
    ci = (REPO / ".ci" / "run").read_text()
    if _calls_install(ci):
        return
    targets = re.findall(r"^\s*make\s+([\w-]+)", ci, re.M)
    assert targets, ".ci/run neither calls scripts/install.sh nor a make target"
    rules = _make_rules((REPO / "Makefile").read_text())
    for t in targets:
        assert _make_target_installs(rules, t), (
            f".ci/run runs `make {t}`, which does not reach scripts/install.sh")


def test_dockerfile_verifies_models_before_the_install():
    text = (REPO / "Dockerfile").read_text()
    # models copied and verified before the package sources are copied and installed
    models = re.search(r"^COPY synth7t/models/ ", text, re.M)
    verify = re.search(r"^RUN python3 scripts/verify_models\.py", text, re.M)
    sources = re.search(r"^COPY synth7t/ ", text, re.M)
    assert models and verify and sources and models.start() < verify.start() < sources.start()
    assert "scripts/install.sh /opt/venv --deps-only" in text[:models.start()]
    for arg in ("PIP_CERT", "PIP_FIND_LINKS", "TORCH_INDEX_URL", "BASE_IMAGE"):
        assert re.search(rf"^ARG {arg}=", text, re.M), arg
    sdef = (REPO / "Singularity.def").read_text()
    assert "scripts/verify_models.py" in parse_def(sdef)[1]["post"]


def test_build_script_is_valid_shell_and_documents_its_options():
    script = REPO / "scripts" / "build_image.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for opt in ("--engine", "--base", "--gpu", "--tag", "--context", "save"):
        assert opt in proc.stdout, opt


def test_no_machine_paths_in_the_recipes():
    """The host's pip settings are read at build time, never written into the repository."""
    for name in ("Dockerfile", "Singularity.def", ".dockerignore", "scripts/build_image.sh",
                 ".ci/run", "scripts/install.sh"):
        text = (REPO / name).read_text()
        for path in ("/opt/wheels", "/etc/ssl/certs", "/etc/xdg/pip", "/work/", "/root/.config"):
            assert path not in text, f"{name} names the machine path {path}"
