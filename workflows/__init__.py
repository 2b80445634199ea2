"""Nipype layer of synth7t: interfaces wrapping ``synth7t`` functions and ``init_*_wf`` factories.

Import order matters: :func:`synth7t.reference.setup_templateflow` runs before niworkflows (and
thus TemplateFlow) is imported, so the shipped templates are used and nothing is downloaded.
"""
import os

os.environ.setdefault("NIPYPE_NO_ET", "1")

from synth7t.reference import setup_templateflow  # noqa: E402

setup_templateflow()
