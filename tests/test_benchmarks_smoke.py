"""The speed benchmark runs end to end on tiny sizes and writes well-formed results.

Timings are not checked (they depend on the machine); the collective count is.
"""
from __future__ import annotations

import os
from typing import Dict, List

import pytest
import torch

from smoke import PNG_LIMIT_BYTES, run_smoke
from syncbn.testing import run_on_ranks


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Dict:
    return run_smoke("benchmarks.run", tmp_path_factory.mktemp("bench"), "speed_results.md", timeout=180)


def _table_rows(markdown: str, header_start: str) -> List[List[str]]:
    """Cells of every data row of the tables whose header begins with ``header_start``."""
    rows, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith(header_start):
            in_table = True
        elif in_table and line.startswith("|---"):
            continue
        elif in_table and line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        else:
            in_table = False
    return rows


def test_json_holds_every_section_and_the_machine_stamp(smoke_run):
    results = smoke_run["results"]
    for key in ("mode", "command", "machine", "plan", "layers", "comm", "model", "payload_growth",
                "gpu", "guard", "targets", "profiles", "rank_layout", "load_average"):
        assert key in results, key
    for key in ("cpu", "cores", "gpu", "torch", "mpi4py", "mpi_library", "load_1_5_15_min"):
        assert results["machine"][key], key
    backends = {row["setting"]["backend"] for row in results["layers"]}
    assert {"none", "gloo", "mpi"} <= backends


def test_every_layer_row_has_peers_ratios_and_a_comm_split(smoke_run):
    for row in smoke_run["results"]["layers"]:
        assert {"BatchNorm", "syncbn", "naive"} <= set(row["peers"])
        assert row["ratios"]["syncbn_vs_batchnorm"] > 0
        assert row["peers"]["syncbn"]["comm_ms"] <= row["peers"]["syncbn"]["ms"]
        assert row["torch_syncbn_note"] == "n/a (CPU)" or not row["setting"]["device"] == "cpu"


def test_markdown_has_one_detail_row_per_layer_case(smoke_run):
    results, markdown = smoke_run["results"], smoke_run["markdown"]
    rows = _table_rows(markdown, "| layer | N/rank | dtype | layout |")
    assert len(rows) == len(results["layers"])
    assert all(len(r) == 12 for r in rows)
    summary = _table_rows(markdown, "| setting | threads/rank | syncbn / BatchNorm")
    assert {r[0] for r in summary} == {row["setting"]["label"] for row in results["layers"]}
    assert _table_rows(markdown, "| target | setting | measured | status |")


def test_plots_are_readable_small_pngs(smoke_run):
    import matplotlib.image

    pngs = sorted(p for p in os.listdir(smoke_run["out"]) if p.endswith(".png"))
    assert len(pngs) == 5
    for name in pngs:
        path = os.path.join(smoke_run["out"], name)
        assert os.path.getsize(path) < PNG_LIMIT_BYTES, name
        assert matplotlib.image.imread(path).ndim == 3, name
        assert f"]({name})" in smoke_run["markdown"], f"{name} is not linked from speed_results.md"


def test_syncbn_makes_exactly_two_collectives_per_layer_step_and_none_in_eval(smoke_run):
    for row in smoke_run["results"]["layers"]:
        channels, alone = row["case"]["channels"], row["setting"]["world_size"] == 1
        # A group of one is torch's BatchNorm: no collective at all.
        assert row["peers"]["syncbn"]["collectives_per_step"] == [0 if alone else 2], row["case"]["label"]
        assert row["collectives_eval"] == 0
        # Forward: count, sums, squared sums, shifts, squared shifts, invalid-input and fp64-input
        # flags (syncbn/batchnorm_math.py); backward: sum dy, sum dy*xhat, both fp64.
        expected = [] if alone else [[4 * channels + 3, "float64"], [2 * channels, "float64"]]
        assert row["train_payloads"] == expected
    for row in smoke_run["results"]["model"]:
        per_layer = 0 if row["setting"]["world_size"] == 1 else 2
        assert row["peers"]["syncbn"]["collectives_per_step"] == [per_layer * row["norm_layers"]]
    collective_target = smoke_run["results"]["targets"][-1]
    assert collective_target["status"] == "met", collective_target


def test_guard_rows_compare_debug_on_and_off_at_world_size_2(smoke_run):
    rows = smoke_run["results"]["guard"]
    assert rows and all(r["setting"]["label"] == "gloo, W=2" for r in rows)
    for row in rows:
        assert row["ratios"]["guard_on_vs_off"] > 0
        assert row["peers"]["syncbn"]["collectives_per_step"] == [2]
        # the guard's fingerprint all-reduce precedes each of the two payloads
        assert row["peers"]["syncbn debug=True"]["collectives_per_step"] == [4]
    assert len(_table_rows(smoke_run["markdown"], "| setting | case | debug=False ms")) == len(rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the note written without CUDA")
def test_gpu_section_is_skipped_with_a_note_without_cuda(smoke_run):
    assert "no CUDA device" in smoke_run["results"]["gpu"]["skipped"]
    assert "Skipped: no CUDA device" in smoke_run["markdown"]


def test_gpu_rows_render_with_bandwidth_without_a_gpu():
    """The GPU code path past the measurement itself, fed a made-up row."""
    from benchmarks import gpu, report

    case = {"shape": [2, 8, 4, 4], "dtype": "bf16", "label": "8x4x4 N=2 bf16 contiguous"}
    row = gpu.add_bandwidth({"setting": {"label": "nccl on cuda, W=1"}, "case": case,
                             "torch_syncbn_note": None,
                             "peers": {"BatchNorm": {"ms": 0.01}, "syncbn": {"ms": 0.02}}}, 100.0)
    assert row["peers"]["syncbn"]["gbps"] == pytest.approx(row["peers"]["BatchNorm"]["gbps"] / 2)
    text = "\n".join(report._gpu_section({"peak_gbps": 100.0, "peak_source": "made up",
                                          "layers": [row]}))
    assert "8x4x4 N=2 bf16 contiguous" in text and "Peak: 100 GB/s" in text


def test_publish_rewrites_only_its_own_sections(tmp_path):
    from benchmarks.run import replace_section

    path = tmp_path / "BENCHMARKS.md"
    path.write_text("intro\n<!-- section:speed (x) -->\nold\n<!-- end:speed -->\n"
                    "<!-- section:other -->\nkeep\n<!-- end:other -->\n")
    replace_section(str(path), "speed", "new\nlines\n")
    assert path.read_text() == ("intro\n<!-- section:speed (x) -->\nnew\nlines\n<!-- end:speed -->\n"
                                "<!-- section:other -->\nkeep\n<!-- end:other -->\n")


def _naive_against_global_batchnorm() -> float:
    """On each of 2 ranks: the naive peer on its half of a batch versus BatchNorm on all of it."""
    import torch.distributed as dist

    from benchmarks.naive_syncbn import NaiveSyncBatchNorm

    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(8, 3, 5, 5, generator=generator, dtype=torch.float64)
    reference = torch.nn.BatchNorm2d(3).double()
    naive = NaiveSyncBatchNorm(3).double()
    mine = full[4 * rank: 4 * rank + 4].clone().requires_grad_()
    everything = full.clone().requires_grad_()
    naive(mine).pow(2).sum().backward()
    (reference(everything).pow(2).sum()).backward()
    errors = [
        (naive(mine) - reference(everything)[4 * rank: 4 * rank + 4]).abs().max(),
        (mine.grad - everything.grad[4 * rank: 4 * rank + 4]).abs().max(),
        (naive.running_var - reference.running_var).abs().max(),
    ]
    return float(max(errors))


def test_naive_peer_computes_global_batchnorm_over_two_ranks():
    errors = run_on_ranks(_naive_against_global_batchnorm, 2, "gloo")
    assert max(errors) < 1e-10


def test_resnet50_has_53_batchnorm_layers_with_26560_channels():
    """torchvision's resnet50 holds 53 BatchNorm2d modules; their widths add up to
    64 + 1,408 + 3,584 + 10,240 + 11,264 (stem and the four stages, counted by hand)."""
    from benchmarks.scaling import RESNET50_BLOCKS, resnet_bn_channels

    channels = resnet_bn_channels(RESNET50_BLOCKS)
    assert len(channels) == 53 and sum(channels) == 26_560
    assert channels[0] == 64 and channels[-1] == 2048


def test_scaling_model_payloads_match_each_scheme_and_only_torch_grows_with_world_size():
    from benchmarks import scaling

    fabric = scaling.Fabric("test", alpha=5e-6, bus_bandwidth=1e10)
    # syncbn: 4C+3 fp64 forward and 2C fp64 backward (the collective audit in the speed run)
    calls = scaling.layer_collectives("syncbn", 64)
    assert [(c.kind, c.nbytes) for c in calls] == [("all_reduce", 259 * 8), ("all_reduce", 128 * 8)]
    assert len(scaling.layer_collectives("naive", 64)) == 5
    # at W=2 the ring and the tree are the same two steps
    assert scaling.all_reduce_ring(fabric, 2, 4096) == scaling.all_reduce_tree(fabric, 2, 4096)
    channels = scaling.resnet_bn_channels(scaling.RESNET50_BLOCKS)
    ratio = [scaling.step_time(fabric, "torch.nn.SyncBatchNorm", channels, w)
             / scaling.step_time(fabric, "syncbn", channels, w) for w in (64, 1024)]
    assert ratio[1] > ratio[0]  # torch's all_gather payload grows with W, syncbn's does not
    assert scaling.step_time(fabric, "syncbn", channels, 1) == 0.0


@pytest.fixture(scope="module")
def scaling_run(tmp_path_factory) -> Dict:
    import json
    import subprocess
    import sys

    from smoke import REPO

    out = tmp_path_factory.mktemp("scaling")
    completed = subprocess.run([sys.executable, "-m", "benchmarks.scaling", "--smoke", "--out",
                                str(out)], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {"results": json.loads((out / "scaling.json").read_text()),
            "markdown": (out / "scaling.md").read_text(), "out": out}


def test_scaling_projection_says_it_is_a_model_and_shows_sourced_inputs(scaling_run):
    markdown = scaling_run["markdown"]
    assert "This is a model, not a measurement" in markdown
    inputs = _table_rows(markdown, "| fabric | alpha")
    assert {"NVLink", "InfiniBand"} <= {row[0].split(" ")[0] for row in inputs}
    assert all("https://" in row[-1] or "fitted" in row[-1] for row in inputs)
    assert any("ASSUMPTION" in row[-1] for row in inputs)  # a figure without a source says so
    worlds = {r["world_size"] for r in scaling_run["results"]["projection"]}
    assert min(worlds) == 1 and max(worlds) == 1024


def test_scaling_validation_sets_measured_beside_projected_for_each_world_size(scaling_run):
    rows = _table_rows(scaling_run["markdown"], "| backend | W | scheme | collectives | measured")
    measured_worlds = {r["world_size"] for r in scaling_run["results"]["measured"]["rows"]}
    assert {int(r[1]) for r in rows} == measured_worlds
    for row in scaling_run["results"]["validation"]:
        assert row["measured_s"] > 0 and row["projected_tree_s"] > 0
        assert row["collectives"] == 2 * 53 if row["scheme"] == "syncbn" else 5 * 53
    assert os.path.getsize(scaling_run["out"] / "scaling_projection.png") < PNG_LIMIT_BYTES


def test_each_peer_keeps_one_colour_across_panels_and_figures(smoke_run, monkeypatch):
    """Issue 18: syncbn over gloo was orange in one panel of layer_overhead.png, blue in the
    next. Every bar of a (peer, backend) series, in every panel and figure, has one colour,
    and peers never share one."""
    from matplotlib.colors import to_hex

    from benchmarks import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, stamp: figures.append(fig) or path)
    results = smoke_run["results"]
    plots.plot_layer_overhead(results["layers"], "unused", results["machine"])
    plots.plot_model_throughput(results["model"], results["plan"], "unused", results["machine"])
    colours: Dict[str, set] = {}
    for fig in figures:
        for ax in fig.axes:
            for bars in ax.containers:
                peer = bars.get_label().split(" (")[0]
                colours.setdefault(peer, set()).update(to_hex(p.get_facecolor()) for p in bars)
    assert {"syncbn", "naive", "BatchNorm"} <= set(colours)
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({next(iter(c)) for c in colours.values()}) == len(colours)


@pytest.fixture(scope="module")
def overhead_run(tmp_path_factory) -> Dict:
    import json
    import subprocess
    import sys

    from smoke import REPO

    out = tmp_path_factory.mktemp("overhead")
    completed = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--only",
                                "overhead", "--out", str(out)], cwd=REPO, capture_output=True,
                               text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return {"results": json.loads((out / "overhead.json").read_text()),
            "markdown": (out / "overhead.md").read_text()}


def test_overhead_section_runs_alone_with_all_reduces_timed_beside_syncbn(overhead_run):
    results, markdown = overhead_run["results"], overhead_run["markdown"]
    assert "layers" not in results and "compile" not in results  # the section alone
    labels = {r["setting"]["label"] for r in results["overhead"]}
    assert {"none (1 process), W=1", "gloo, W=2"} <= labels
    for row in results["overhead"]:
        assert set(row["peers"]) == {"BatchNorm", "syncbn", "all-reduces"}
        assert all(p["ms"] > 0 for p in row["peers"].values())
    rows = _table_rows(markdown, "| setting | case | BatchNorm µs")
    assert len(rows) == len(results["overhead"])
    targets = _table_rows(markdown, "| target | setting | measured | status |")
    assert {t[1] for t in targets} == labels  # one goal per setting: W=1 and each W=2 backend
    assert all(t[3] in ("met", "missed") for t in targets)


@pytest.mark.slow
def test_compile_section_compares_compiled_with_eager(tmp_path):
    """Slow: torch.compile of a small ResNet takes minutes on a loaded 2-core machine."""
    import json
    import subprocess
    import sys

    from smoke import REPO

    completed = subprocess.run([sys.executable, "-m", "benchmarks.run", "--smoke", "--only",
                                "compile", "--out", str(tmp_path)], cwd=REPO, capture_output=True,
                               text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    rows = json.loads((tmp_path / "compile.json").read_text())["compile"]
    assert [r["setting"]["label"] for r in rows] == ["none (1 process), W=1", "gloo, W=2"]
    for row in rows:
        assert row["peers"]["eager"]["ms"] > 0 and row["peers"]["compiled"]["ms"] > 0
        assert row["graphs"] >= 1 and row["norm_layers"] == 9
    assert len(_table_rows((tmp_path / "compile.md").read_text(), "| setting | norm layers")) == 2
