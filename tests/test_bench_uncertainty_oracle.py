"""The anatomy-aware oracle of ``benchmarks/bench_uncertainty.py --oracle``."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from bench_uncertainty import leave_one_out, oracle_scores  # noqa: E402


def test_leave_one_out_is_the_mean_of_the_other_draws():
    v = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    np.testing.assert_allclose(leave_one_out(v), [[4.0, 8.0], [3.0, 6.0], [2.0, 4.0]])
    with pytest.raises(ValueError):
        leave_one_out(v[:1])


def test_oracle_ranks_a_fixed_error_pattern_and_not_a_draw_lottery():
    rng = np.random.default_rng(0)
    pattern = rng.uniform(0.0, 1.0, 5000)          # the anatomy's own error structure
    fixed = [pattern + 0.05 * rng.standard_normal(5000) for _ in range(4)]
    lottery = [rng.uniform(0.0, 1.0, 5000) for _ in range(4)]   # nothing shared by draws
    flat_map = [np.ones(5000) + 1e-6 * rng.standard_normal(5000) for _ in range(4)]
    a = oracle_scores([np.abs(e) for e in fixed], flat_map)
    b = oracle_scores(lottery, flat_map)
    assert min(a["oracle_spearman"]) > 0.9 and all(a["oracle_monotonic"])
    assert max(b["oracle_spearman"]) < 0.1 and not all(b["oracle_monotonic"])
    assert max(abs(r) for r in a["map_spearman"]) < 0.1
