"""The accuracy study runs end to end in its tiny mode and writes sane, well-formed results.

Checks ranges and invariants, not the study's findings (those need the full run).
"""
from __future__ import annotations

import os
from typing import Dict

import pytest

from smoke import PNG_LIMIT_BYTES, run_smoke


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Dict:
    return run_smoke("benchmarks.accuracy", tmp_path_factory.mktemp("accuracy"), "results.md", timeout=240)


def test_files_and_machine_stamp(smoke_run):
    results, out = smoke_run["results"], smoke_run["out"]
    assert results["mode"] == "smoke"
    for key in ("cpu", "cores", "torch"):
        assert results["machine"][key], key
    for name in ("accuracy_stats_error.png", "accuracy_classification.png",
                 "accuracy_segmentation.png"):
        size = os.path.getsize(out / name)
        assert 0 < size < PNG_LIMIT_BYTES, (name, size)
    markdown = smoke_run["markdown"]
    assert "| per-rank batch b | local BN | SyncBN W=2 |" in markdown
    assert "syncbn.SyncBatchNorm" in markdown and results["command"] in markdown


def test_statistics_errors_are_positive_and_syncbn_is_closer(smoke_run):
    stats = smoke_run["results"]["stats"]
    reference = {r["per_rank_batch"]: r for r in stats if r["source"] == "single process"}
    measured = [r for r in stats if r["source"] != "single process"]
    assert measured and reference
    for row in stats:
        for key in ("local_mean_err", "local_var_err", "sync_mean_err", "sync_var_err"):
            assert 0 < row[key] < 10, (row, key)
    for row in measured:
        world, batch = row["world_size"], row["per_rank_batch"]
        assert world > 1
        if batch == 1:
            assert row["sync_var_err"] < row["local_var_err"]
            assert row["sync_mean_err"] < row["local_mean_err"]
        # The ranks' batches together are the one-process batches of b*W (same sampler):
        # SyncBN's error over real ranks is the one-process error at the global batch.
        expected = reference[batch * world]
        assert row["sync_mean_err"] == pytest.approx(expected["local_mean_err"], rel=1e-3)
        assert row["sync_var_err"] == pytest.approx(expected["local_var_err"], rel=1e-3)


def test_training_scores_in_range_and_syncbn_tracks_full_batch(smoke_run):
    training = smoke_run["results"]["training"]
    assert {r["task"] for r in training} == {"classification", "segmentation"}
    assert {r["arm"] for r in training} == {"local", "sync", "group", "full"}
    for row in training:
        assert 0.0 <= row["score"] <= 1.0 and 0.0 <= row["val_score"] <= 1.0, row
        assert all(loss > 0 for loss in row["final_loss_per_rank"]), row
    score = {(r["task"], r["arm"], r["per_rank_batch"], r["lr"]): r["score"] for r in training}
    for (task, arm, batch, lr), value in score.items():
        if arm == "sync":  # same global batches, same init, averaged gradients: same model
            assert value == pytest.approx(score[(task, "full", batch, lr)], abs=0.02)


def test_every_arm_is_tuned_on_the_grid_and_reported_at_its_best_validation_score(smoke_run):
    results = smoke_run["results"]
    plan, training = results["plan"], results["training"]
    for task in ("classification", "segmentation"):
        for arm in plan["arms"]:
            runs = [r for r in training if r["task"] == task and r["arm"] == arm]
            sizes = plan["group_channels"] if arm == "group" else [runs[0]["group_channels"]]
            assert {(r["lr"], r["group_channels"]) for r in runs} == {
                (lr, g) for lr in plan["lrs"] for g in sizes}
            chosen = [r for r in runs if r["selected"]]
            assert len(chosen) == 1  # one seed in smoke mode
            assert chosen[0]["val_score"] == max(r["val_score"] for r in runs)
    markdown = smoke_run["markdown"]
    assert "### Tuning grid" in markdown and "| b per rank | arm | setting | validation | test |" in markdown
    assert "### Targets" in markdown


def test_help_shows_no_raw_markup():
    import subprocess
    import sys

    from smoke import REPO

    help_text = subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=60).stdout
    assert "--quick" in help_text and "``" not in help_text


def test_command_prints_the_findings_tables_and_targets(smoke_run):
    out = smoke_run["stdout"]
    assert "- Classification (accuracy" in out and "targets:" in out
    assert "| b per rank | global batch |" in out
    assert out.count("[met]") + out.count("[missed]") >= 3
