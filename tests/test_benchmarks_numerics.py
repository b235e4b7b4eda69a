"""benchmarks.numerics: the plan covers every distribution at W = 1..4, and the Markdown
table has one well-formed row per (dtype, distribution). The measurement itself is the one
tests/test_numerics.py asserts on; here it runs in one process on two small cases."""
from __future__ import annotations

import torch

import syncbn
from benchmarks.adversarial import DISTRIBUTIONS_BY_DTYPE, QUANTITIES, Case, compare, make_layer, run_steps
from benchmarks.numerics import SIZES, plan, render_markdown, result_row


def test_full_plan_runs_every_distribution_of_every_dtype_at_every_world_size():
    cases = plan(quick=False)
    for dtype, choices in DISTRIBUTIONS_BY_DTYPE.items():
        for name, parameter in choices:
            worlds = {len(c.sizes) for c in cases
                      if (c.dtype, c.distribution, c.parameter) == (dtype, name, parameter)}
            assert worlds == set(SIZES), (dtype, name, parameter, worlds)


def test_markdown_has_one_row_per_distribution_with_a_cell_per_quantity():
    cases = [Case("near_constant", torch.float32, (6,), 1.0, spatial=(4,)),
             Case("outlier_first", torch.float32, (6,), 1000.0, spatial=(4,))]
    rows = [result_row(compare(c, [run_steps(make_layer(syncbn.SyncBatchNorm, c), c, slice(None))]))
            for c in cases]
    stamp = {"cpu": "cpu", "cores": "2", "gpu": "none", "torch": torch.__version__, "mpi4py": "-",
             "mpi_library": "-", "load_1_5_15_min": "0", "date_utc": "now"}
    markdown = render_markdown(rows, stamp, "python -m benchmarks.numerics --quick")
    table_rows = [line for line in markdown.splitlines() if line.startswith("| float32")]
    assert len(table_rows) == 2
    for line in table_rows:
        cells = [cell for cell in line.replace("\\|", "").strip("|").split("|")]
        assert len(cells) == 3 + len(QUANTITIES) + 1, line
