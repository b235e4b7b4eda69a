"""Every checkable claim of README.md and launch/README.md, next to the tests that check it.

``CLAIMS`` is the list. A row names the document, an *anchor* (a piece of the claim's text as
the document has it; whitespace is ignored) and the tests that would fail if the claim were
false, as pytest node ids (``tests/test_x.py::test_name``, or ``...::test_name[param-id]`` for
one case of a parametrized test). A claim no test can check here says where it comes from
instead (``source=``: measured once, an upstream fact, a GPU-only behaviour, a derived bound), and
the document must say so next to the claim.

The tests at the bottom check the list itself, fast (test modules are imported, not run):

- every anchor is found, in one paragraph, bullet or table row of its document, so a claim
  whose wording changes must be looked at again here;
- every listed test exists, so renaming or deleting a test that checks a claim fails here;
- where a listed test runs only under ``-m slow`` (deselected by default and in CI), the
  document says ``-m slow`` next to the claim;
- where a row gives a source, the document says it next to the claim.

To add a claim: add a row with its anchor and its test(s). To reword one: update its anchor.
"""
from __future__ import annotations

import ast
import importlib
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from itertools import product
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = "README.md"
LAUNCH = "launch/README.md"


@dataclass(frozen=True)
class Source:
    """Where a claim no test can check comes from, and the words the document must use for it."""

    what: str
    wording: str  # a regular expression the claim's paragraph, bullet or row must match


MEASURED = Source("measured once, by hand or by a benchmark", r"(?i)measured|seen once|python -m benchmarks\.")
UPSTREAM = Source("a fact about torch or another project", r"(?i)torch's source|field notes|pytorch/pytorch#\d+")
NEEDS_GPU = Source("needs a GPU (or GPUs), which CI does not have", r"(?i)not checked here|needs? (a )?GPUs?|not yet on a GPU|on a GPU")
DERIVED = Source("a bound from a rounding-error analysis", r"(?i)rounding-error bound|analysis")
SLOW_WORDING = r"-m slow"


@dataclass(frozen=True)
class Claim:
    doc: str
    anchor: str
    tests: Tuple[str, ...] = ()
    source: Optional[Source] = None
    pending: str = ""  # why the wording check fails for now, and who owns the fix


def claim(anchor: str, *tests: str, doc: str = README, source: Optional[Source] = None,
          pending: str = "") -> Claim:
    return Claim(doc, anchor, tests, source, pending)


T = "tests/"
COMM, COMPILE, CONVERT, DEMO = T + "test_comm.py::", T + "test_compile.py::", T + "test_convert.py::", T + "test_demo.py::"
DIST, INIT, PROPS = T + "test_distributed.py::", T + "test_distributed_init.py::", T + "test_distributed_properties.py::"
DOCS, DOUBLE, FAULTS, MATRIX = T + "test_docs.py::", T + "test_double_backward.py::", T + "test_faults.py::", T + "test_fault_matrix.py::"
FUNCTIONAL, GPU, ONE, GROUPS = T + "test_functional.py::", T + "test_gpu.py::", T + "test_group_of_one.py::", T + "test_groups.py::"
GUARD, LAUNCHER, MODULE, NUMERICS = T + "test_guard.py::", T + "test_launch.py::", T + "test_module.py::", T + "test_numerics.py::"
PRECISE, SOAK, TESTING, TRITON = T + "test_precise_bn.py::", T + "test_soak.py::", T + "test_testing.py::", T + "test_triton_kernels.py::"
KERNELS, LAYER_COST = T + "test_kernels.py::", T + "test_layer_cost.py::"
ACT, MODELS, LIGHTNING, BENCH = T + "test_activated.py::", T + "test_real_models.py::", T + "test_lightning.py::", T + "test_benchmarks_smoke.py::"
MULTIHOST, RENDEZVOUS, NETNS = T + "test_multihost.py::", T + "test_rendezvous.py::", T + "test_netns.py::"
ACCURACY, BENCH_NUMERICS, SELF = T + "test_accuracy_smoke.py::", T + "test_benchmarks_numerics.py::", T + "test_readme_claims.py::"
PLUGIN = T + "test_pytest_plugin.py::"

PARITY = MODELS + "test_two_ranks_of_two_images_under_ddp_equal_one_process_on_the_global_batch"
SAME_FUNCTION = MODELS + "test_converted_model_computes_the_same_function_in_train_and_eval"
SKIPPED_LAYER = (GUARD + "test_debug_guard_turns_a_skipped_layer_into_an_error_on_every_rank",
                 FAULTS + "test_a_skipped_layer_raises_the_guard_error_on_every_rank")
CHECKPOINTING = (GUARD + "test_activation_checkpointing_updates_running_stats_once_per_step",
                 GUARD + "test_nested_checkpoints_update_running_stats_once_per_step",
                 MATRIX + "test_row7_running_stats_update_once_per_step_also_when_the_forward_runs_in_backward")
BAD_INPUT = (MODULE + "test_bad_input_raises_clear_error_naming_the_layer",
             GUARD + "test_invalid_input_on_one_rank_raises_on_every_rank_without_hanging",
             GUARD + "test_input_on_another_device_than_the_layer_is_refused_with_both_devices_named",
             MATRIX + "test_row1_bad_input_to_a_layer_without_parameters_or_buffers_raises_on_every_rank",
             GPU + "test_training_step_reads_no_device_value")
GLOBAL_BATCH = (DIST + "test_three_ranks_equal_float64_batchnorm_on_the_global_batch",
                PROPS + "test_any_rank_layout_shape_dtype_and_options_equal_float64_batchnorm")
COLLECTIVES = DIST + "test_one_packed_collective_forward_one_backward_none_in_eval"
EVERY_LAUNCHER = INIT + "test_every_launcher_gives_every_rank_its_place_and_the_same_weights"
RECIPES = (LAUNCHER + "test_recipe_is_valid_bash", LAUNCHER + "test_torchrun_recipe_on_two_nodes_over_loopback",
           LAUNCHER + "test_mpirun_recipe_with_a_localhost_hostfile",
           INIT + "test_the_srun_recipe_is_valid_bash_and_asks_slurm_for_its_tasks")
FAIL_FAST = (LAUNCHER + "test_the_failing_rank_exit_code_is_the_launcher_exit_code",
             LAUNCHER + "test_a_rank_dying_before_a_collective_fails_the_job_fast",
             LAUNCHER + "test_timeout_stops_the_job_and_names_the_ranks_still_running",
             LAUNCHER + "test_a_signal_to_the_launcher_stops_every_rank_and_leaves_no_orphan",
             FAULTS + "test_a_rank_killed_by_sigkill_mid_forward_ends_the_job",
             FAULTS + "test_a_rank_raising_inside_forward_ends_the_job_with_its_exception")
NO_GROUP = (COMM + "test_several_ranks_announced_without_a_group_raise_instead_of_normalizing_alone",
            MATRIX + "test_row5_gloo_a_launched_script_that_never_initializes_a_group_raises_on_every_rank",
            MATRIX + "test_row5_srun_tasks_that_never_initialize_a_group_raise_on_every_rank")
TORCH_REFUSES_CPU = SELF + "test_torch_syncbatchnorm_refuses_cpu_training_once_a_group_is_initialized"
BROKEN_ENVIRONMENT = INIT + "test_an_environment_that_cannot_make_a_group_raises_at_once_naming_the_variables_and_the_fix"
BATCH_SCRIPT = INIT + "test_a_slurm_batch_script_without_srun_is_one_process_at_once_and_the_warning_names_srun"
MISSING_RANK = (INIT + "test_a_rank_that_never_comes_ends_the_wait_at_the_timeout_on_every_rank_naming_those_that_came",
                INIT + "test_under_syncbn_launch_a_rank_that_never_comes_is_named_by_every_rank_that_came")
NO_STORE = INIT + "test_a_rank_that_finds_no_store_says_where_it_looked_at_the_timeout"
ABORT_AFTER_INIT = MATRIX + "test_row4_mpi_after_init_distributed_an_uncaught_exception_under_a_bare_mpiexec_aborts_the_job"
EXIT_GRACE = (MATRIX + "test_mpi_a_rank_that_returns_while_another_waits_for_it_ends_the_job_after_the_exit_grace",
              MATRIX + "test_gloo_a_rank_that_exits_0_before_the_group_exists_ends_the_job_after_the_exit_grace",
              MATRIX + "test_ranks_that_finish_apart_after_their_last_collective_succeed_within_the_default_grace",
              LAUNCHER + "test_a_negative_exit_grace_is_a_usage_error",
              DOCS + "test_documented_exit_grace_default_is_the_launcher_s")
GROUPED_ERRORS = LAUNCHER + "test_the_summary_shows_each_error_once_grouping_ranks_that_differ_only_in_the_rank"
SIGNAL_AFTER_CTRL_C = LAUNCHER + "test_after_ctrl_c_the_summary_states_the_signal_each_rank_really_got"
# SyncBatchNormAct gives the values and gradients of SyncBatchNorm followed by the activation.
ACT_PARITY = (ACT + "test_one_process_equals_float64_batchnorm_then_activation_in_place",
              ACT + "test_layouts_and_options_equal_the_oracle_and_keep_the_layout",
              ACT + "test_ranks_equal_float64_batchnorm_then_activation_on_the_global_batch",
              ACT + "test_input_autograd_still_needs_runs_out_of_place_with_the_gradients_of_the_original",
              ACT + "test_weight_near_zero_falls_back_out_of_place_with_correct_grads",
              ACT + "test_half_precision_gradients_are_those_of_syncbatchnorm_then_the_activation",
              ACT + "test_any_activation_module_runs_out_of_place_and_equals_the_oracle",
              ACT + "test_bias_false_trains_fused_with_the_gradients_of_batchnorm_without_bias",
              ACT + "test_checkpointing_gives_the_gradients_and_statistics_of_the_plain_model",
              ACT + "test_compiles_whole_with_fullgraph_and_trains_like_eager",
              MODELS + "test_fused_model_has_the_outputs_gradients_and_statistics_of_the_original")
PRECISE_RANKS = (PRECISE + "test_two_ranks_with_uneven_batches_equal_the_global_population_in_two_collectives",
                 PRECISE + "test_ranks_with_different_batch_counts_pool_every_batch_without_a_mismatch")
PLUGIN_OUTCOMES = PLUGIN + "test_results_are_ordinary_pytest_results_naming_each_failing_rank"
PLUGIN_FRESH_RANKS = PLUGIN + "test_a_skip_on_some_ranks_only_fails_and_a_broken_group_gets_fresh_ranks"
PLUGIN_STALLS = PLUGIN + "test_a_hang_or_early_exit_fails_within_the_timeout_naming_the_stalled_rank"
PLUGIN_OPTIONS = PLUGIN + "test_options_select_stop_and_format_as_usual_and_fifty_tests_share_one_pool"

CLAIMS: List[Claim] = [
    # --- README: introduction ------------------------------------------------------------
    claim("reduces every channel's count, sum and sum of squares over all ranks, so each rank "
          "normalizes with the statistics of the global batch", *GLOBAL_BATCH),
    claim("reduces the two gradient sums in the backward pass", COLLECTIVES),
    claim("It is a drop-in for `torch.nn.SyncBatchNorm` and `torch.nn.BatchNorm{1,2,3}d`",
          MODULE + "test_state_dict_keys_and_constructor_match_torch_syncbatchnorm",
          MODULE + "test_options_equal_batchnorm_over_several_steps",
          CONVERT + "test_convert_replaces_every_batchnorm_and_keeps_state_flags_and_group"),
    claim("the same code syncs over torch.distributed (NCCL, gloo, any process group) or over an "
          "mpi4py communicator", *GLOBAL_BATCH, GPU + "test_gpu_parity_with_float64_batchnorm"),
    # --- README: set-up ---------------------------------------------------------------------
    claim("(Python 3.10+, and 3.11+ for the test suite, whose pinned `triton==3.9.0` needs it",
          DOCS + "test_readme_python_floors_are_those_of_requires_python_and_the_pinned_packages",
          DOCS + "test_library_source_parses_with_the_grammar_of_its_oldest_python"),
    claim('pip install "torch==2.13.0" -e ".[demo]" && python examples/demo.py',
          DEMO + "test_demo_prints_match_and_payoff"),
    claim("run the test suite (this is what CI runs)",
          DOCS + "test_torch_floor_is_the_version_readme_pins_and_ci_runs_readme_s_test_command"),
    claim("The demo prints that the synchronized statistics equal those of the full global batch, "
          "and how much closer they are to the population statistics than each rank's own",
          DEMO + "test_demo_prints_match_and_payoff"),
    claim("it took 37 s on 2 CPU cores when last measured, the first build of the native CPU kernels "
          "included", source=MEASURED),
    claim("The second command installs the `test` extra:",
          DOCS + "test_readme_names_every_package_the_test_extra_installs"),
    claim("the GPU kernels run through its interpreter on CPU", TRITON + "test_kernels_in_interpreter",
          ACT + "test_kernels_in_interpreter"),
    claim("suite took about 9 minutes on 2 CPU cores when last measured", source=MEASURED),
    claim("Long soak, fuzz and real-model runs are marked `slow` and left out",
          DOCS + "test_slow_runs_are_left_out_by_default_and_selected_by_m_slow"),
    claim("install the CPU build from PyTorch's CPU-only index first",
          DOCS + "test_torch_floor_is_the_version_readme_pins_and_ci_runs_readme_s_test_command"),
    claim("install the torch build you want (2.13 or later) first and drop the pin",
          DOCS + "test_torch_floor_is_the_version_readme_pins_and_ci_runs_readme_s_test_command"),
    # --- README: CPU kernels ------------------------------------------------------------------
    claim("On CPU tensors (fp32 and fp64; fp16 and bf16 computed in fp32) the layer runs native C++ kernels",
          KERNELS + "test_the_switches_choose_the_cpu_backend",
          KERNELS + "test_layer_step_through_the_kernels_is_within_twice_torch_error_plus_floor"),
    claim("a training step at W >= 2 dispatches at most 20 torch ops (BatchNorm2d: 7)",
          LAYER_COST + "test_a_layer_step_at_w2_dispatches_at_most_20_ops_on_the_default_cpu_path"),
    claim("In eager mode the layer's normalize and its backward are one C++ autograd node, whose results "
          "are bitwise those of the Python `autograd.Function` the other backends take",
          FUNCTIONAL + "test_sync_batch_norm_on_native_cpu_input_takes_the_node_and_w_1_takes_batchnorm",
          FUNCTIONAL + "test_the_native_node_computes_bitwise_what_the_python_function_computes"),
    claim("The kernels are compiled on first use, not at `import syncbn`",
          KERNELS + "test_without_a_working_compiler_the_reference_serves_after_one_warning"),
    claim("21 s on 2 CPU cores when last measured", source=MEASURED),
    claim("with `$SYNCBN_CXX`, else `$CXX`, else `c++`, for the CPU they run on, and cached per source, "
          "torch version, compiler and CPU under `$SYNCBN_CACHE` (default `~/.cache/syncbn`)",
          KERNELS + "test_the_compiler_and_the_cache_come_from_the_environment"),
    claim("ranks that start together build once",
          KERNELS + "test_ranks_starting_together_build_once_and_load_the_same_library"),
    claim("Their results do not depend on the thread count, bitwise",
          KERNELS + "test_native_results_do_not_depend_on_the_thread_count"),
    claim("one warning says why and the reference kernels serve instead",
          KERNELS + "test_without_a_working_compiler_the_reference_serves_after_one_warning"),
    claim("`SYNCBN_NATIVE=0` turns the native kernels off, and `SYNCBN_KERNELS=reference` takes the "
          "reference everywhere", KERNELS + "test_the_switches_choose_the_cpu_backend"),
    claim("Every backend is tested against the reference and against float64 BatchNorm on the global batch",
          KERNELS + "test_layer_step_through_the_kernels_is_within_twice_torch_error_plus_floor",
          KERNELS + "test_native_layer_step_equals_the_reference"),
    # --- README: usage --------------------------------------------------------------------
    claim("One training script for every launcher", EVERY_LAUNCHER,
          LAUNCHER + "test_train_example_under_the_launcher"),
    claim("one process: the layers compute BatchNorm",
          INIT + "test_a_single_process_reports_single_and_trains_as_batchnorm"),
    claim('`pip install "syncbn[mpi]"` installs both (mpi4py and the mpich wheel)',
          INIT + "test_the_mpi_install_hint_works_from_an_index_and_from_a_clone"),
    claim("`syncbn.init_distributed(backend=None, *, timeout=None)` initializes torch.distributed's "
          "default group and returns `syncbn.DistInfo(rank, world_size, local_rank, launcher)`",
          DOCS + "test_readme_prints_signatures_as_the_code_has_them[syncbn.init_distributed]",
          EVERY_LAUNCHER),
    claim("Checked in that order, so torchrun or mpiexec started by srun wins over srun",
          INIT + "test_the_launcher_is_read_from_the_environment"),
    claim("`\"slurm\"` (srun: `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS`, `SLURM_LOCALID`)",
          INIT + "test_the_launcher_is_read_from_the_environment", EVERY_LAUNCHER,
          MATRIX + "test_row5_srun_tasks_that_never_initialize_a_group_raise_on_every_rank"),
    claim("A Slurm batch script run without srun (`SLURM_NTASKS` but no `SLURM_STEP_NUM_TASKS`) runs "
          "once: a single process, with a warning naming srun", BATCH_SCRIPT,
          INIT + "test_the_launcher_is_read_from_the_environment"),
    claim("A rendezvous that cannot complete ends on every rank within `init_distributed(timeout=...)`, "
          "else `SYNCBN_TIMEOUT` seconds, naming the address tried",
          RENDEZVOUS + "test_rank_0_left_waiting_for_a_rank_ends_at_syncbn_timeout_naming_the_store",
          RENDEZVOUS + "test_a_rank_that_cannot_reach_rank_0_gives_up_at_the_timeout_naming_the_address",
          MULTIHOST + "test_an_mpi_rendezvous_at_an_unreachable_address_fails_on_every_rank_naming_it"),
    claim("Under MPI, rank 0 hosts the rendezvous on a port the OS picks",
          RENDEZVOUS + "test_ranks_on_rank_0s_network_stack_meet_it_over_loopback",
          RENDEZVOUS + "test_other_hosts_are_offered_every_address_but_loopback_the_host_names_first",
          MULTIHOST + "test_mpi_ranks_on_hosts_with_their_own_unresolvable_names_meet_at_rank_0s_address"),
    claim("`local_rank` comes from the launcher's variable, else from the ranks' host names",
          INIT + "test_the_mpi_local_rank_comes_from_the_launchers_variable",
          INIT + "test_without_a_variable_the_mpi_local_rank_is_counted_from_host_names"),
    claim("Under srun, rank 0's host is `MASTER_ADDR`, else the first host of `SLURM_STEP_NODELIST`",
          INIT + "test_slurm_rank_zero_is_the_first_host_of_the_step_else_of_the_job",
          INIT + "test_slurm_host_lists_expand", INIT + "test_malformed_slurm_host_lists_are_refused",
          INIT + "test_the_slurm_port_is_master_port_or_a_function_of_the_job_id"),
    claim('`backend` defaults to `"nccl"` when CUDA is available, else `"gloo"`',
          INIT + "test_the_default_backend_is_gloo_without_cuda",
          INIT + "test_nccl_puts_each_rank_on_the_gpu_of_its_local_rank_before_the_group_starts",
          INIT + "test_a_rank_that_sees_one_gpu_uses_it"),
    claim("Idempotent: with a group already initialized it returns this rank's place in it",
          INIT + "test_an_existing_group_is_reported_not_initialized_again"),
    claim("An environment that cannot make a group (a rank outside the world; `RANK` or `WORLD_SIZE` "
          "missing, empty or not a whole number; a world of 0; no `MASTER_PORT`) raises a "
          "`RuntimeError` at once, naming the variables and the fix", BROKEN_ENVIRONMENT),
    claim("a rank that never comes ends the wait at the timeout on every rank that came, naming the "
          "missing rank(s)", *MISSING_RANK),
    claim("a rank that finds no store says where it looked", NO_STORE),
    claim("Under MPI it also makes an uncaught exception abort the job", ABORT_AFTER_INIT),
    claim("Afterwards syncbn's default group is that torch.distributed group under every launcher",
          EVERY_LAUNCHER, INIT + "test_an_mpi_communicator_passed_explicitly_still_syncs_over_mpi"),
    claim("The same script gives bitwise-identical weights and running statistics under",
          INIT + "test_the_trained_weights_and_running_stats_are_bitwise_identical_across_launchers"),
    claim("A different thread count can change the last bits (seen once",
          LAUNCHER + "test_the_user_thread_setting_wins", source=MEASURED),
    claim("debug=None, check_finite=False)` takes torch.nn.SyncBatchNorm's arguments, parameters, "
          "buffers and state_dict keys",
          DOCS + "test_readme_prints_signatures_as_the_code_has_them[syncbn.SyncBatchNorm]",
          MODULE + "test_state_dict_keys_and_constructor_match_torch_syncbatchnorm",
          MODULE + "test_bias_and_options_are_keyword_only_as_readme_prints_them",
          MODULE + "test_bias_false_has_torch_s_parameters_and_keys_and_trains_like_batchnorm"),
    claim("`None`: the torch.distributed default group if it is initialized; else `MPI.COMM_WORLD`",
          COMM + "test_default_group_is_torch_distributed_if_initialized_else_mpi_world",
          COMM + "test_mpi_launch_is_detected_from_the_environment",
          COMM + "test_importing_syncbn_does_not_initialize_mpi",
          COMM + "test_default_group_without_distributed_or_mpi_is_a_single_process",
          ONE + "test_single_process_is_bitwise_batchnorm_over_three_steps"),
    claim("a torch.distributed `ProcessGroup` (any backend, any sub-group), an mpi4py `MPI.Comm`, or "
          "a `syncbn.comm.Communicator`", COMM + "test_a_communicator_object_is_used_as_given",
          GROUPS + "test_groups_of_two_see_different_data_and_each_matches_its_own_full_batch",
          *GLOBAL_BATCH),
    claim("`syncbn.new_groups(k)` builds consistent groups of `k` consecutive ranks on every rank",
          GROUPS + "test_groups_of_two_see_different_data_and_each_matches_its_own_full_batch",
          GROUPS + "test_group_size_must_divide_the_world",
          GROUPS + "test_single_process_groups_of_one_are_the_process_itself"),
    claim("mirrors `torch.nn.functional.batch_norm`",
          DOCS + "test_readme_prints_signatures_as_the_code_has_them[syncbn.functional.sync_batch_norm]",
          FUNCTIONAL + "test_eps_validation_matches_f_batch_norm",
          FUNCTIONAL + "test_bias_without_weight_gets_the_gradient_f_batch_norm_gives"),
    # --- README: compared with torch.nn.SyncBatchNorm ----------------------------------------
    claim("Every statement in the syncbn column is checked by the tests named in the last column",
          SELF + "test_every_listed_test_exists", DOCS + "test_tests_the_docs_name_exist"),
    claim("The torch.nn.SyncBatchNorm column is read from torch's source", TORCH_REFUSES_CPU,
          source=UPSTREAM),
    claim("with a group initialized, CPU training raises `ValueError` (checked on torch 2.13) | CPU and CUDA",
          TORCH_REFUSES_CPU, *GLOBAL_BATCH, GPU + "test_gpu_parity_with_float64_batchnorm"),
    claim("| Backends | torch.distributed | torch.distributed (gloo, NCCL, any group) and mpi4py", *GLOBAL_BATCH),
    claim("one all-reduce of 4C+3 fp64 values (independent of W); on CPU a second one when the first "
          "shows the merge lost precision", COLLECTIVES,
          NUMERICS + "test_named_case_on_two_uneven_ranks_is_within_twice_torch_error_plus_floor"),
    claim("one all-reduce of 2C fp64 values (so ranks with different input dtypes still agree)",
          COLLECTIVES, FUNCTIONAL + "test_float64_on_one_rank_float32_on_another_is_harmless"),
    claim("torch's own batch_norm, so bitwise BatchNorm{1,2,3}d: output, gradients, double backward, "
          "running stats, num_batches_tracked, every dtype and layout; no collective",
          ONE + "test_single_process_is_bitwise_batchnorm_over_three_steps",
          ONE + "test_single_process_double_backward_is_bitwise_batchnorm",
          ONE + "test_single_process_issues_no_collective",
          ONE + "test_torch_distributed_group_of_one_is_bitwise_batchnorm_and_issues_no_collective",
          ONE + "test_harness_finds_batchnorm_bitwise_equal_to_itself",
          MODULE + "test_empty_batch_returns_empty_output_and_leaves_running_stats_untouched"),
    claim("| | yes, 1e-9 in fp64 |", *GLOBAL_BATCH,
          DIST + "test_global_count_zero_gives_empty_output_zero_grads_and_untouched_stats"),
    claim("at most 2x torch BatchNorm's own on the global batch plus a few ulps",
          NUMERICS + "test_named_case_in_one_process_is_within_twice_torch_error_plus_floor",
          NUMERICS + "test_named_case_on_two_uneven_ranks_is_within_twice_torch_error_plus_floor",
          NUMERICS + "test_adversarial_battery_is_within_twice_torch_error_plus_floor",
          NUMERICS + "test_harness_scores_torch_batchnorm_at_ratio_one",
          BENCH_NUMERICS + "test_full_plan_runs_every_distribution_of_every_dtype_at_every_world_size"),
    claim("second-order gradients equal float64 BatchNorm on the global batch to 1e-8 on 2 and 3 ranks",
          DOUBLE + "test_second_order_grads_on_uneven_ranks_equal_float64_batchnorm",
          DOUBLE + "test_gradgradcheck_functional_with_weight_and_bias_in_one_process",
          DOUBLE + "test_gradgradcheck_module_in_train_mode_with_running_stats_in_one_process"),
    claim("`SyncBatchNormAct` raises a clear error in training, on every path alike",
          ACT + "test_double_backward_raises_a_clear_error_on_every_training_path"),
    claim("its backward is not differentiable (per the project's field notes; not checked here: it "
          "needs CUDA)", source=UPSTREAM),
    claim("no graph break (`fullgraph=True` works): collectives and host checks are custom operators; "
          "compiled equals eager on 2 gloo ranks", COMPILE + "test_dynamo_finds_no_graph_break",
          COMPILE + "test_compiled_training_equals_eager_on_two_gloo_ranks"),
    claim("`SyncBatchNormAct` compiles with `fullgraph=True` too, running unfused, and trains as in eager",
          ACT + "test_compiles_whole_with_fullgraph_and_trains_like_eager"),
    claim("harmless: both payloads are fp64, every rank equals float64 BatchNorm to its dtype's precision",
          FUNCTIONAL + "test_float64_on_one_rank_float32_on_another_is_harmless"),
    claim("| fp16 / bf16 input with fp32 parameters | | yes, statistics in fp32 or wider",
          MODULE + "test_half_input_with_fp32_layer_returns_input_dtype_and_fp32_statistics",
          MODULE + "test_fully_half_model_trains_without_dtype_errors"),
    claim("| A global count of 1 | | on CPU, the same clear error on every rank; on GPU only with the "
          "debug guard or `check_finite`, else no rank raises",
          DIST + "test_global_count_one_raises_on_every_rank", GPU + "test_training_step_reads_no_device_value",
          GPU + "test_meta_device_catches_a_host_read"),
    claim("every rank raises, naming the layer and the channel(s), before running stats change",
          FUNCTIONAL + "test_running_means_that_differ_across_ranks_raise_on_every_rank_before_stats_change",
          FUNCTIONAL + "test_running_means_that_differ_only_by_their_dtype_rounding_train_on"),
    claim("that rank raises naming the layer, and on CPU every other rank too, naming the bad rank(s); "
          "on GPU the others raise "
          "only with the debug guard or `check_finite`", *BAD_INPUT),
    claim("with the debug guard: an error on every rank naming the layer and ranks", *SKIPPED_LAYER),
    claim("| Activation checkpointing | running stats updated twice | once per logical step", *CHECKPOINTING),
    claim("| eval() | no communication | no communication",
          DIST + "test_eval_on_one_rank_alone_returns_without_communicating", COLLECTIVES),
    claim("| Inside DistributedDataParallel | yes | yes, equals full-batch training",
          DIST + "test_ddp_training_equals_single_process_full_batch_training"),
    claim("yes, also converts torch.nn.SyncBatchNorm",
          CONVERT + "test_convert_replaces_every_batchnorm_and_keeps_state_flags_and_group"),
    claim("restores the class each layer was converted from",
          CONVERT + "test_revert_restores_the_original_classes_and_state",
          CONVERT + "test_layer_from_torch_syncbatchnorm_reverts_to_a_batchnorm_that_runs_on_cpu",
          CONVERT + "test_directly_built_layer_reverts_by_the_dims_it_saw",
          CONVERT + "test_layer_from_torch_syncbatchnorm_that_saw_no_input_is_not_guessed",
          CONVERT + "test_revert_of_an_unused_directly_built_layer_explains_what_is_missing"),
    claim("Running stats stay identical across ranks over 2,000 steps",
          SOAK + "test_running_stats_stay_bitwise_identical_across_ranks_and_match_float64_replay"),
    # --- README: launching jobs --------------------------------------------------------------
    claim("starts N local workers and never leaves a job hanging", *FAIL_FAST, *EXIT_GRACE),
    claim("(also `python -m syncbn.launch`)",
          LAUNCHER + "test_the_syncbn_launch_console_script_is_installed_and_runs",
          LAUNCHER + "test_three_gloo_ranks_match_the_full_batch_with_each_line_prefixed"),
    claim("gloo / nccl workers get torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, "
          "and one MASTER_PORT for all, a free port)",
          LAUNCHER + "test_lines_arrive_whole_on_their_own_stream_and_in_the_log_dir",
          LAUNCHER + "test_three_gloo_ranks_match_the_full_batch_with_each_line_prefixed"),
    claim("the rendezvous store lives in the launcher, as torchrun's agent hosts it, so workers may exit "
          "at different times (within `--exit-grace`, below)", EXIT_GRACE[2], MISSING_RANK[1]),
    claim("mpi workers run under the mpiexec of the mpich wheel",
          LAUNCHER + "test_mpi_backend_two_ranks_match_the_full_batch",
          LAUNCHER + "test_mpi_backend_without_mpiexec_names_the_fix"),
    claim("Every line arrives whole, prefixed with its rank (`[rank1] ...`); `--log-dir` also writes "
          "one file per rank", LAUNCHER + "test_lines_arrive_whole_on_their_own_stream_and_in_the_log_dir"),
    claim("Fail fast: when a worker exits non-zero or dies by a signal, or `--timeout` passes", *FAIL_FAST,
          MATRIX + "test_row4_gloo_an_uncaught_exception_on_one_rank_ends_the_job"),
    claim("Ranks whose errors differ only in the rank number are shown once, with one traceback",
          GROUPED_ERRORS,
          MATRIX + "test_row5_gloo_a_launched_script_that_never_initializes_a_group_raises_on_every_rank"),
    claim("the summary states the signal each rank really got", SIGNAL_AFTER_CTRL_C),
    claim("124 for `--timeout` or `--exit-grace`",
          LAUNCHER + "test_timeout_stops_the_job_and_names_the_ranks_still_running", *EXIT_GRACE[:2]),
    claim("those still running `--exit-grace` seconds later (default 30) are taken to wait for it, in a "
          "collective or the rendezvous, and are stopped as above, named, with exit status 124", *EXIT_GRACE),
    claim("For more than one machine, `launch/` holds recipes a user edits", *RECIPES),
    claim("The hang is torch's, not syncbn's", source=UPSTREAM),
    claim("Measured once (a hang at exit is a race, which no test here reproduces on demand)",
          source=MEASURED),
    claim("`syncbn.testing.run_on_ranks(fn, world_size, backend=\"gloo\" | \"mpi\", args=(), timeout=120)`",
          TESTING + "test_results_come_back_in_rank_order",
          TESTING + "test_a_rank_exception_is_reraised_with_its_rank_and_traceback",
          TESTING + "test_a_stalled_rank_fails_the_call_naming_it_and_all_ranks_are_killed",
          TESTING + "test_a_dead_rank_fails_the_call_fast_with_its_exit_code",
          TESTING + "test_unknown_backend_is_refused"),
    # --- README: testing on several ranks (the pytest plugin) ------------------------------------
    claim("the plugin is registered when syncbn is installed (entry point `pytest11`, name `syncbn`; "
          "elsewhere `-p syncbn.pytest_plugin`), and the test runs on every rank",
          PLUGIN + "test_pyproject_declares_the_pytest11_entry_point_and_the_installed_metadata_agrees",
          PLUGIN + "test_the_entry_point_and_an_explicit_load_register_the_plugin_once", PLUGIN_OUTCOMES),
    claim("runs a picklable function on fresh ranks (a FileStore rendezvous, no fixed port) and returns "
          "what each rank returned", TESTING + "test_results_come_back_in_rank_order",
          TESTING + "test_a_stalled_rank_fails_the_call_naming_it_and_all_ranks_are_killed"),
    claim("| the ranks | a pool per (n, backend), reused across tests; fresh ranks after a test that broke "
          "its group | fresh for each `run_on_ranks`; a `RankPool` keeps them across its `run` calls |",
          PLUGIN_FRESH_RANKS, PLUGIN_OPTIONS,
          TESTING + "test_a_rank_exception_is_reraised_with_its_rank_and_traceback"),
    claim("`MPI.COMM_WORLD` ready, and a torch.distributed group (gloo, its rendezvous over MPI): "
          "syncbn's default group | ranks under mpiexec, torch.distributed left uninitialized: "
          "syncbn's default group is `MPI.COMM_WORLD` |",
          PLUGIN + "test_mpi_ranks_have_a_torch_group_and_mpi_and_fail_hang_and_recover_like_gloo",
          COMM + "test_default_group_is_torch_distributed_if_initialized_else_mpi_world[mpi-MPICommunicator]"),
    claim("an ordinary pytest failure naming the failing rank(s), with each one's assertion rewritten by "
          "pytest and traceback (`--tb` and `-l` apply), and what the other ranks did | the first "
          "failing rank's exception, re-raised with its remote traceback |", PLUGIN_OUTCOMES, PLUGIN_OPTIONS,
          TESTING + "test_a_rank_exception_is_reraised_with_its_rank_and_traceback"),
    claim("the test fails at its `timeout`, naming the rank(s) still running, each with its Python stack; "
          "every rank is killed, and the next test runs on fresh ranks | `RankFailure` naming the stalled "
          "rank(s), with their stacks; every rank is killed |", PLUGIN_STALLS,
          TESTING + "test_a_stalled_rank_fails_the_call_naming_it_and_all_ranks_are_killed"),
    claim("| a rank's process exits | the test fails at once, naming the rank and its exit code | "
          "`RankFailure` naming the rank and its exit code |", PLUGIN_STALLS,
          TESTING + "test_a_dead_rank_fails_the_call_fast_with_its_exit_code"),
    claim("| inputs | fixtures and `parametrize` values, set up in the pytest process and pickled to every "
          "rank (`tmp_path` is the same folder on every rank) | `args=`, `kwargs=` |", PLUGIN_OUTCOMES,
          PLUGIN + "test_misuse_is_reported_without_starting_ranks"),
    claim("`pytest.skip` on every rank skips the test; on some ranks only, the test fails", PLUGIN_OUTCOMES,
          PLUGIN_FRESH_RANKS),
    claim("`-k`, `-x`, `--lf` select and stop as usual", PLUGIN_OPTIONS),
    claim("Each rank's stdout and stderr appear as captured sections of the report (printed as "
          "`[rankN] ...` lines under `-s`)", PLUGIN_OUTCOMES, PLUGIN_OPTIONS),
    claim("50 two-rank tests run in seconds (11 s, 5 s of it starting the ranks, measured once on 2 "
          "loaded CPU cores)", PLUGIN_OPTIONS, source=MEASURED),
    claim("Loading the plugin imports neither torch nor mpi4py, and a session without the marker starts "
          "no process", PLUGIN + "test_loading_the_plugin_imports_neither_torch_nor_mpi4py_and_starts_nothing",
          PLUGIN + "test_misuse_is_reported_without_starting_ranks"),
    # --- README: reliability ------------------------------------------------------------------
    claim("**Bad input** (fewer than 2 dims, wrong channel count, a non-floating dtype, a tensor on "
          "another device than the parameters) raises a clear error naming the layer", *BAD_INPUT),
    claim("**NaN / Inf** propagate as in torch BatchNorm",
          GUARD + "test_by_default_nan_propagates_like_batchnorm",
          GUARD + "test_check_finite_refuses_a_nan_batch_on_every_rank_and_keeps_running_stats",
          GUARD + "test_check_finite_refuses_a_non_finite_batch_in_a_group_of_one_and_keeps_running_stats"),
    claim("**Debug guard**: `SYNCBN_DEBUG=1` (read at the first training step) or `debug=True` makes "
          "ranks cross-check", GUARD + "test_debug_guard_names_different_channel_counts_across_ranks",
          GUARD + "test_syncbn_debug_turns_the_guard_on_as_set_at_the_first_training_step",
          GUARD + "test_debug_guard_adds_one_small_cross_check_before_each_collective",
          MATRIX + "test_row3_debug_guard_tells_unnamed_layers_of_the_same_width_apart",
          BENCH + "test_guard_rows_compare_debug_on_and_off_at_world_size_2", *SKIPPED_LAYER),
    claim("Over gloo it surfaces as `syncbn.CollectiveError` naming the layer and the group",
          GUARD + "test_a_torch_distributed_timeout_names_the_layer_that_waited",
          GUARD + "test_a_failed_collective_is_reported_with_the_layer_and_the_group"),
    claim("torch's NCCL watchdog, not syncbn, ends the process at the timeout", source=NEEDS_GPU),
    claim("a watchdog aborts the job after `SYNCBN_TIMEOUT` seconds (default 1800)",
          GUARD + "test_the_mpi_watchdog_aborts_a_stuck_collective_naming_the_layer",
          COMM + "test_mpi_watchdog_aborts_only_a_collective_still_waiting_after_its_notice"),
    claim("**Activation checkpointing** (`torch.utils.checkpoint`, both modes, nested checkpoints "
          "included) updates running statistics once per logical step", *CHECKPOINTING),
    claim("a non-finite batch raises `FloatingPointError` on every rank before the running statistics "
          "change (in a group of one too)",
          GUARD + "test_check_finite_refuses_a_nan_batch_on_every_rank_and_keeps_running_stats",
          GUARD + "test_check_finite_refuses_a_non_finite_batch_in_a_group_of_one_and_keeps_running_stats"),
    claim("Checked per channel, so a permutation, a sign flip or one channel among large ones is caught",
          FUNCTIONAL + "test_running_means_that_differ_across_ranks_raise_on_every_rank_before_stats_change"),
    claim("every other rank too, naming the bad rank(s)",
          GUARD + "test_invalid_input_on_one_rank_raises_on_every_rank_without_hanging"),
    claim("when one worker dies, the others are stopped within seconds and the launcher prints which "
          "rank failed", *FAIL_FAST,
          MATRIX + "test_row6_the_summary_shows_each_ranks_own_exception_and_prefixes_are_not_doubled"),
    claim("Killing `syncbn-launch` itself, even with SIGKILL, ends every worker",
          MATRIX + "test_row6_sigkill_of_the_launcher_leaves_no_rank_or_child_of_a_rank_behind"),
    claim("Under a bare `mpiexec -n N python train.py`, an uncaught exception on a rank that has called "
          "`syncbn.init_distributed()`, or where syncbn has created its MPI communicator",
          MATRIX + "test_row4_mpi_an_uncaught_exception_under_a_bare_mpiexec_aborts_the_job", ABORT_AFTER_INIT),
    claim("the first divergent collective raises on every rank and names the layer", *SKIPPED_LAYER),
    claim("Switch to `model.eval()` for such work: eval makes no collective at all",
          DIST + "test_eval_on_one_rank_alone_returns_without_communicating"),
    claim("build sub-groups with `syncbn.new_groups(k)`, which creates them identically everywhere",
          GROUPS + "test_groups_of_two_see_different_data_and_each_matches_its_own_full_batch",
          GROUPS + "test_groups_in_a_job_of_several_ranks_without_a_group_name_the_missing_initialization"),
    claim("the first training step raises a `RuntimeError` saying what to call", *NO_GROUP),
    claim("`--timeout` on `syncbn-launch` bounds the whole job",
          LAUNCHER + "test_timeout_stops_the_job_and_names_the_ranks_still_running"),
    # --- README: GPU ----------------------------------------------------------------------------
    claim("the layer runs fused Triton kernels when Triton is installed",
          TRITON + "test_kernels_in_interpreter", TRITON + "test_layer_through_the_kernels_equals_float64_batchnorm",
          TRITON + "test_cpu_tensors_keep_the_torch_path_without_the_interpreter"),
    claim("seven launches per training step besides the two all-reduces",
          GPU + "test_layer_step_launches_at_most_12_kernels_on_the_cuda_path"),
    claim("`SYNCBN_TRITON=0` turns it off", TRITON + "test_syncbn_triton_0_turns_triton_off_on_cuda"),
    claim("a Triton that fails to import leaves the torch kernels",
          TRITON + "test_a_triton_that_fails_at_import_leaves_syncbn_on_its_torch_kernels"),
    claim("each GPU runs a one-time self-test of the kernels at first use",
          TRITON + "test_self_test_passes_on_healthy_kernels",
          TRITON + "test_self_test_catches_a_failing_and_a_wrong_kernel",
          TRITON + "test_a_failing_kernel_hands_the_call_to_the_reference_and_warns_once", source=NEEDS_GPU),
    claim("Ranks may mix the two paths: they send the same payload", TRITON + "test_kernels_equal_float64"),
    claim("`--dry-run` runs its CPU form anywhere and prints the kernels each section runs",
          GPU + "test_gpu_validate_dry_run_measures_syncbns_kernels_without_a_gpu"),
    claim("In a group of more than one, a training step makes no host synchronization",
          GPU + "test_training_step_reads_no_device_value", GPU + "test_meta_device_catches_a_host_read"),
    claim("2^-52 * (W + 1) * (1 + (mean - running_mean)^2 / var)", source=DERIVED),
    claim("reads num_batches_tracked on the host only for momentum=None",
          GPU + "test_training_step_reads_no_device_value"),
    claim("The kernels are checked in CI on CPU through Triton's interpreter, not yet on a GPU",
          TRITON + "test_kernels_in_interpreter", ACT + "test_kernels_in_interpreter", source=NEEDS_GPU),
    claim("NCCL needs one GPU per rank", LAUNCHER + "test_nccl_refuses_more_ranks_than_gpus"),
    # --- README: works with -----------------------------------------------------------------------
    claim("| torchvision resnet50, fcn_resnet50, deeplabv3_mobilenet_v3_large; timm resnet10t, dla46_c |",
          PARITY + "[torchvision_resnet50]", PARITY + "[torchvision_fcn_resnet50]",
          PARITY + "[torchvision_deeplabv3_mobilenet_v3_large]", PARITY + "[timm_resnet10t]",
          PARITY + "[timm_dla46_c]", SAME_FUNCTION),
    claim("| torchvision RetinaNet, trainable BatchNorm2d backbone |",
          MODELS + "test_retinanet_running_stats_equal_one_process_and_a_ddp_step_keeps_ranks_identical"),
    claim("| timm BatchNormAct2d (efficientnet_b0), torchvision FrozenBatchNorm2d |",
          MODELS + "test_timm_batchnorm_act_becomes_sync_batchnorm_act_computing_the_same_function_and_reverts",
          MODELS + "test_timm_batchnorm_act_with_a_prelu_keeps_its_state_dict_keys_both_ways",
          MODELS + "test_frozen_batchnorm_is_left_alone",
          CONVERT + "test_batchnorm_subclass_with_its_own_forward_is_refused_naming_path_and_class",
          CONVERT + "test_registered_converter_and_reverter_keep_what_the_subclass_computes"),
    claim("| Lightning `strategy=\"ddp\"`, 2 CPU processes |",
          LIGHTNING + "test_ddp_on_two_cpu_processes_trains_with_syncbn_layers_that_equal_the_global_batch"),
    claim("| `precise_bn` | population statistics of all batches of all ranks (uneven batch sizes and counts), "
          "in 2 all-reduces counted with syncbn and with torch BatchNorm layers, gloo and MPI |", *PRECISE_RANKS),
    claim("| `convert_sync_batchnorm_act`: timm resnetv2_18 (LeakyReLU), ghostnet_050, efficientnet_b0, "
          "mobilenetv3_small_050; torchvision regnet_x_400mf (LeakyReLU) |",
          MODELS + "test_fused_model_has_the_outputs_gradients_and_statistics_of_the_original"),
    claim("torch's spelling works; state_dicts load both ways with BatchNorm2d and "
          "torch.nn.SyncBatchNorm checkpoints", CONVERT + "test_classmethod_spelling_converts_like_the_function",
          CONVERT + "test_torch_checkpoint_loads_strictly_into_a_syncbn_model_and_computes_the_same",
          CONVERT + "test_syncbn_checkpoint_loads_strictly_into_a_torch_model_and_computes_the_same"),
    claim("the plugin replaces Lightning's `sync_batchnorm=True`, whose torch.nn.SyncBatchNorm refuses CPU",
          LIGHTNING + "test_ddp_on_two_cpu_processes_trains_with_syncbn_layers_that_equal_the_global_batch",
          TORCH_REFUSES_CPU),
    claim("each layer's running statistics become the mean and unbiased variance of every value it "
          "sees in the batches of all ranks",
          PRECISE + "test_single_process_population_statistics_equal_the_oracle_not_the_mean_batch_variance",
          PRECISE + "test_large_mean_in_fp32_keeps_the_variance", *PRECISE_RANKS),
    claim("one all-reduce of the shifts before the first batch, one of every layer's sums after the last, "
          "none per batch or per layer", PRECISE_RANKS[0]),
    claim("so ranks may also run different numbers of batches", PRECISE_RANKS[1]),
    claim("never modifies the batches", PRECISE + "test_batches_are_not_modified_with_an_activated_first_layer"),
    claim("num_batches_tracked and the layers' process groups restored",
          PRECISE + "test_state_is_restored_and_hooks_removed", PRECISE_RANKS[0]),
    claim("num_batches=200)  # on every rank; counts may differ", PRECISE + "test_num_batches_limits_the_batches_used",
          PRECISE_RANKS[1]),
    # --- README: in-place activated SyncBatchNorm ----------------------------------------------------
    claim("`syncbn.SyncBatchNormAct(num_features, ..., activation=\"leaky_relu\", negative_slope=0.01, "
          "inplace=True, device=None, dtype=None, *, bias=True, alpha=1.0, drop=None, fuse=True, name=None, "
          "debug=None, check_finite=False)` is SyncBatchNorm fused with its activation",
          DOCS + "test_readme_prints_signatures_as_the_code_has_them[syncbn.SyncBatchNormAct]",
          ACT + "test_constructor_takes_torch_s_positions_and_keyword_only_options"),
    claim("autograd keeps only that output and a few per-channel vectors",
          ACT + "test_graph_keeps_only_the_output_and_per_channel_vectors",
          ACT + "test_one_process_equals_float64_batchnorm_then_activation_in_place"),
    claim("In place, the output also goes into the input's own storage",
          ACT + "test_one_process_equals_float64_batchnorm_then_activation_in_place",
          ACT + "test_layouts_and_options_equal_the_oracle_and_keep_the_layout"),
    claim("the debug guard and state_dict keys are SyncBatchNorm's",
          ACT + "test_same_collectives_and_payloads_as_syncbatchnorm_none_in_eval",
          ACT + "test_invalid_input_on_one_rank_raises_on_every_rank",
          ACT + "test_debug_guard_turns_mismatched_layers_into_an_error_on_every_rank",
          ACT + "test_state_dict_keys_are_syncbatchnorm_s_and_a_batchnorm_checkpoint_loads",
          ACT + "test_ranks_equal_float64_batchnorm_then_activation_on_the_global_batch",
          ACT + "test_checkpoint_recompute_updates_running_stats_once"),
    claim("it runs on CPU and GPU (fused Triton kernels)", ACT + "test_kernels_in_interpreter",
          ACT + "test_layer_through_the_kernels_equals_the_oracle"),
    claim("It is a memory optimisation only: every path below gives the values and gradients of "
          "SyncBatchNorm followed by the activation", *ACT_PARITY),
    claim("Fused: `\"identity\"`, `\"leaky_relu\"` (slope > 0) and `\"elu\"` (or those modules), in fp32 and fp64",
          ACT + "test_one_process_equals_float64_batchnorm_then_activation_in_place",
          ACT + "test_convert_fuses_invertible_pairs_keeps_state_names_and_outputs_and_reverts_exactly"),
    claim("ReLU is refused by name", ACT + "test_relu_by_name_is_refused_with_the_reason_and_the_alternatives",
          ACT + "test_any_activation_module_runs_out_of_place_and_equals_the_oracle"),
    claim("**In place** only with `inplace=True` and when nothing can still need the input",
          ACT + "test_inplace_false_keeps_the_input_and_gives_the_same_results",
          ACT + "test_leaf_input_falls_back_to_a_new_output_and_stays_untouched",
          ACT + "test_view_input_falls_back_and_leaves_its_base_untouched",
          ACT + "test_input_autograd_still_needs_runs_out_of_place_with_the_gradients_of_the_original",
          ACT + "test_the_same_input_from_a_producer_that_keeps_nothing_is_written_in_place",
          ACT + "test_graph_keeps_only_the_output_and_per_channel_vectors",
          ACT + "test_hooks_that_see_the_input_make_the_layer_run_out_of_place",
          ACT + "test_a_forward_hook_of_the_producer_keeps_its_output_unchanged",
          ACT + "test_training_step_on_the_device_path_reads_nothing_back_and_builds_no_tensor_from_host_data"),
    claim("**Fused out of place** otherwise: a new output, the input untouched, still only the output kept",
          ACT + "test_leaf_input_falls_back_to_a_new_output_and_stays_untouched",
          ACT + "test_graph_keeps_only_the_output_and_per_channel_vectors"),
    claim("**Unfused** (SyncBatchNorm, `drop`, then the activation, keeping the input): in evaluation, "
          "under `torch.compile`", ACT + "test_eval_uses_running_statistics_and_the_activation",
          ACT + "test_compiles_whole_with_fullgraph_and_trains_like_eager",
          ACT + "test_one_process_equals_float64_batchnorm_then_activation_in_place",
          ACT + "test_half_precision_gradients_are_those_of_syncbatchnorm_then_the_activation",
          ACT + "test_any_activation_module_runs_out_of_place_and_equals_the_oracle",
          ACT + "test_weight_near_zero_falls_back_out_of_place_with_correct_grads"),
    claim("the backward checks the floor per channel on the device and gives NaN gradients for a channel "
          "below it", ACT + "test_on_a_device_a_weight_below_the_floor_gives_nan_gradients_never_imprecise_ones",
          ACT + "test_bias_false_and_a_weight_below_the_floor_through_the_kernels"),
    claim("Changing the fused layer's output in place afterwards (`out += shortcut`) makes backward raise an "
          "error naming the layer",
          ACT + "test_output_modified_in_place_afterwards_makes_backward_raise_naming_the_layer"),
    claim("Double backward raises in training on every path alike",
          ACT + "test_double_backward_raises_a_clear_error_on_every_training_path",
          ACT + "test_double_backward_in_evaluation_is_batchnorm_and_the_activation"),
    claim("`syncbn.convert_sync_batchnorm_act(model)` fuses `BatchNorm -> LeakyReLU/ELU/Identity` pairs",
          ACT + "test_convert_fuses_invertible_pairs_keeps_state_names_and_outputs_and_reverts_exactly",
          ACT + "test_convert_leaves_unrelated_layers_and_existing_fused_layers_alone",
          ACT + "test_fusing_converted_syncbatchnorms_keeps_their_group_and_reverts_to_them",
          ACT + "test_pairs_fusing_would_change_are_left_alone",
          ACT + "test_an_uninitialised_lazy_batchnorm_is_refused_before_anything_is_replaced",
          ACT + "test_a_batchnorm_without_bias_fuses_and_keeps_torch_s_keys",
          MODELS + "test_timm_batchnorm_act_becomes_sync_batchnorm_act_computing_the_same_function_and_reverts"),
    claim("It asks for in place only where the norm's input is the previous child's output and that child "
          "is a Linear, Conv or ConvTranspose",
          ACT + "test_convert_fuses_invertible_pairs_keeps_state_names_and_outputs_and_reverts_exactly",
          ACT + "test_a_pre_activation_block_fuses_out_of_place_and_keeps_its_shortcut",
          ACT + "test_a_norm_after_a_module_other_than_a_conv_or_linear_fuses_out_of_place"),
    claim("Fused counts are tested on timm's resnetv2_18",
          MODELS + "test_fused_model_has_the_outputs_gradients_and_statistics_of_the_original"),
    claim("`syncbn.revert_sync_batchnorm_act(model)` puts the original modules back",
          ACT + "test_convert_fuses_invertible_pairs_keeps_state_names_and_outputs_and_reverts_exactly",
          ACT + "test_fusing_converted_syncbatchnorms_keeps_their_group_and_reverts_to_them",
          MODELS + "test_fused_model_has_the_outputs_gradients_and_statistics_of_the_original"),
    claim("`syncbn.revert_sync_batchnorm` (what Lightning calls at teardown) makes fused layers plain "
          "BatchNorm and the activation, and leaves SyncBatchNormAct layers you built yourself as they are",
          ACT + "test_revert_sync_batchnorm_turns_fused_layers_into_batchnorm_and_the_activation",
          ACT + "test_revert_sync_batchnorm_checks_every_layer_before_replacing_any",
          LIGHTNING + "test_ddp_on_two_cpu_processes_trains_with_syncbn_layers_that_equal_the_global_batch"),
    claim("Memory (`python -m benchmarks.memory`, one CPU process, see BENCHMARKS.md)",
          ACT + "test_norm_act_layers_keep_at_least_40_percent_fewer_bytes_in_whole_networks",
          ACT + "test_step_peak_grows_more_slowly_with_the_batch_than_syncbn_plus_activation",
          source=MEASURED),
    claim("A training step of these networks measured within 1.15x of the same network with "
          "SyncBatchNorm + activation (0.93x-1.09x), in one process and at W=2", source=MEASURED),
    # --- README: benchmarks, layout ------------------------------------------------------------
    claim("`python -m benchmarks.run [--quick] [--only overhead|compile|...]` measures speed and scaling",
          BENCH + "test_json_holds_every_section_and_the_machine_stamp",
          BENCH + "test_overhead_section_runs_alone_with_all_reduces_timed_beside_syncbn",
          BENCH + "test_naive_peer_computes_global_batchnorm_over_two_ranks",
          ACCURACY + "test_files_and_machine_stamp", BENCH_NUMERICS + "test_markdown_has_one_row_per_distribution_with_a_cell_per_quantity",
          BENCH + "test_scaling_projection_says_it_is_a_model_and_shows_sourced_inputs",
          BENCH + "test_scaling_validation_sets_measured_beside_projected_for_each_world_size"),
    claim("(mean ± std over 3 seeds; `--quick` runs one seed, only indicative)",
          ACCURACY + "test_the_full_plan_repeats_full_batch_bn_at_syncbn_s_setting_for_every_other_seed",
          ACCURACY + "test_a_one_seed_run_says_it_is_only_indicative_and_cannot_be_published",
          ACCURACY + "test_targets_are_judged_on_the_mean_over_seeds_paired_at_syncbn_s_learning_rate"),
    claim("| `syncbn/batchnorm_math.py` |", DOCS + "test_project_layout_names_paths_that_exist"),
    # --- launch/README.md ------------------------------------------------------------------------
    claim("`train_example.py`, a small conv net that runs unchanged under all of them", *RECIPES,
          LAUNCHER + "test_train_example_under_the_launcher", doc=LAUNCH),
    claim("Run the recipes from the repository root (they default to `SCRIPT=launch/train_example.py`)",
          *RECIPES, doc=LAUNCH),
    claim("Every rank must run the same SyncBatchNorm layers in the same order", *SKIPPED_LAYER, doc=LAUNCH),
    claim("srun's `SLURM_PROCID`/`SLURM_STEP_NUM_TASKS`", INIT + "test_the_launcher_is_read_from_the_environment",
          BATCH_SCRIPT, doc=LAUNCH),
    claim("Under plain `mpiexec`, an uncaught exception on one rank aborts the whole job within seconds "
          "once `syncbn.init_distributed()` has run on that rank, as `train_example.py` does at its start",
          ABORT_AFTER_INIT, MATRIX + "test_row4_mpi_an_uncaught_exception_under_a_bare_mpiexec_aborts_the_job",
          doc=LAUNCH),
    claim("raises a `RuntimeError` saying so at its first training step", *NO_GROUP, doc=LAUNCH),
    claim("each rank gets torchrun's variables (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, "
          "`MASTER_ADDR=127.0.0.1`, `MASTER_PORT`, `GROUP_RANK`, `ROLE_RANK`, ...)",
          LAUNCHER + "test_gloo_ranks_get_the_variables_torchrun_gives_them", doc=LAUNCH),
    claim("so `init_process_group(backend)` needs no arguments and a script that works under "
          "`torchrun --standalone` works here", LAUNCHER + "test_three_gloo_ranks_match_the_full_batch_with_each_line_prefixed",
          LAUNCHER + "test_train_example_under_the_launcher", doc=LAUNCH),
    claim("so ranks that finish at different times do not break each other (within `--exit-grace`, below)",
          EXIT_GRACE[2], MISSING_RANK[1], doc=LAUNCH),
    claim("More ranks than `torch.cuda.device_count()` is refused at once",
          LAUNCHER + "test_nccl_refuses_more_ranks_than_gpus", doc=LAUNCH),
    claim("The ranks get mpiexec's `PMI_RANK`, `PMI_SIZE` and `MPI_LOCALRANKID` and none of torchrun's "
          "variables", LAUNCHER + "test_mpi_ranks_get_mpiexecs_variables_and_none_of_torchruns",
          INIT + "test_the_mpi_local_rank_comes_from_the_launchers_variable", EVERY_LAUNCHER, doc=LAUNCH),
    claim("`syncbn.init_distributed()` builds the torch.distributed group from them",
          LAUNCHER + "test_mpi_backend_two_ranks_match_the_full_batch", EVERY_LAUNCHER, doc=LAUNCH),
    claim("A script that does not call it syncs syncbn's layers over `MPI.COMM_WORLD`",
          MATRIX + "test_row5_mpi_the_mpi_world_is_found_from_the_environment_even_with_world_size_set",
          doc=LAUNCH),
    claim("`OMP_NUM_THREADS` defaults to cores / N (at least 1) unless you set it",
          LAUNCHER + "test_the_user_thread_setting_wins", doc=LAUNCH),
    claim("each line of each rank arrives whole on the launcher's stdout or stderr",
          LAUNCHER + "test_lines_arrive_whole_on_their_own_stream_and_in_the_log_dir", doc=LAUNCH),
    claim("**Fail fast**: when a rank exits non-zero or dies by a signal", *FAIL_FAST,
          MATRIX + "test_row6_the_summary_shows_each_ranks_own_exception_and_prefixes_are_not_doubled",
          doc=LAUNCH),
    claim("Ranks whose errors differ only in the rank number are shown together, with one traceback",
          GROUPED_ERRORS, doc=LAUNCH),
    claim("**A rank that finishes while another still needs it**", *EXIT_GRACE, doc=LAUNCH),
    claim("the launcher drops that label where its own `[rankK] ` already says the same",
          MATRIX + "test_row6_the_summary_shows_each_ranks_own_exception_and_prefixes_are_not_doubled",
          doc=LAUNCH),
    claim("**Exit status**: 0 when every rank exited 0",
          LAUNCHER + "test_the_failing_rank_exit_code_is_the_launcher_exit_code",
          LAUNCHER + "test_a_signal_to_the_launcher_stops_every_rank_and_leaves_no_orphan",
          LAUNCHER + "test_timeout_stops_the_job_and_names_the_ranks_still_running",
          MATRIX + "test_row4_gloo_an_uncaught_exception_on_one_rank_ends_the_job", SIGNAL_AFTER_CTRL_C,
          *EXIT_GRACE[:2], LAUNCHER + "test_a_negative_exit_grace_is_a_usage_error",
          LAUNCHER + "test_nccl_refuses_more_ranks_than_gpus",
          LAUNCHER + "test_mpi_backend_without_mpiexec_names_the_fix", doc=LAUNCH),
    claim("**A launcher killed by SIGKILL** runs no code",
          MATRIX + "test_row6_sigkill_of_the_launcher_leaves_no_rank_or_child_of_a_rank_behind", doc=LAUNCH),
    claim("`train_example.py` trains to weights and running statistics bitwise equal to 4 ranks on one "
          "host (`OMP_NUM_THREADS=1` on both sides)",
          MULTIHOST + "test_torchrun_recipe_on_two_hosts_sharing_a_name_trains_as_one_host",
          MULTIHOST + "test_mpirun_recipe_on_two_hosts_sharing_a_name_trains_as_one_host",
          MULTIHOST + "test_slurm_recipe_on_two_nodes_trains_as_one_host", doc=LAUNCH),
    claim("MPI ranks on hosts whose names resolve nowhere meet at rank 0's address",
          MULTIHOST + "test_mpi_ranks_on_hosts_with_their_own_unresolvable_names_meet_at_rank_0s_address",
          MULTIHOST + "test_an_mpi_rendezvous_at_an_unreachable_address_fails_on_every_rank_naming_it",
          MULTIHOST + "test_an_srun_rendezvous_at_an_unreachable_address_ends_every_rank_within_the_timeout",
          MULTIHOST + "test_a_rank_killed_on_host_2_ends_the_torchrun_job_on_host_1_naming_it",
          MULTIHOST + "test_a_rank_killed_on_host_2_ends_the_mpiexec_job_on_host_1_naming_it", doc=LAUNCH),
    claim("Without namespaces they skip with the reason, except as root or with `CI` set, where they "
          "fail instead", NETNS + "test_where_namespaces_are_missing_the_tests_fail_as_root_or_under_ci_else_skip",
          NETNS + "test_a_machine_without_iproute2_fails_the_fixture_where_required_else_skips", doc=LAUNCH),
]


# --- a claim about torch itself, which no module test checks ---------------------------------

def test_torch_syncbatchnorm_refuses_cpu_training_once_a_group_is_initialized(tmp_path):
    """README's comparison table and its Lightning paragraph: torch.nn.SyncBatchNorm needs an
    accelerator; with a group initialized (here one gloo rank, in this process) CPU training
    raises ValueError."""
    import torch
    import torch.distributed as dist

    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1),
                                rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="GPU"):
            torch.nn.SyncBatchNorm(3)(torch.randn(4, 3))
    finally:
        if owned:
            dist.destroy_process_group()


# --- the list's own checks ---------------------------------------------------------------------

def _normalized(text: str) -> str:
    return " ".join(text.split())


@lru_cache(maxsize=None)
def blocks(doc: str) -> Tuple[str, ...]:
    """The document's paragraphs, list items, table rows, headings and fenced blocks, each with
    its whitespace normalized: the unit a claim and what it says of its tests live in."""
    out: List[str] = []
    current: List[str] = []
    fenced = False

    def flush() -> None:
        if current:
            out.append(_normalized(" ".join(current)))
            current.clear()

    for line in (ROOT / doc).read_text().splitlines():
        if line.startswith("```"):
            if fenced:
                current.append(line)
                flush()
            else:
                flush()
                current.append(line)
            fenced = not fenced
            continue
        if fenced:
            current.append(line)
        elif not line.strip():
            flush()
        elif line.startswith(("|", "#")):
            flush()
            out.append(_normalized(line))
        else:
            if re.match(r"\s{0,3}(?:[-*]|\d+\.) ", line):
                flush()
            current.append(line)
    flush()
    return tuple(out)


def block_of(row: Claim) -> Optional[str]:
    anchor = _normalized(row.anchor)
    found = [block for block in blocks(row.doc) if anchor in block]
    return found[0] if len(found) == 1 else None


def _test_module(path: str) -> Any:
    """The test module at ``path``, imported as pytest imports it (tests/ is on sys.path)."""
    tests_dir = str(ROOT / "tests")
    if tests_dir not in sys.path:
        sys.path.insert(0, tests_dir)
    return importlib.import_module(Path(path).stem)


def _marks(obj: Any) -> List[Any]:
    marks = getattr(obj, "pytestmark", [])
    return [getattr(m, "mark", m) for m in (marks if isinstance(marks, list) else [marks])]


def _param_id(value: Any, argnames: Sequence[str], index: int) -> str:
    values = value if len(argnames) > 1 else (value,)
    parts = []
    for name, item in zip(argnames, values):
        if isinstance(item, (str, int, float, bool, type(None))):
            parts.append(str(item))
        elif getattr(item, "__name__", None):
            parts.append(item.__name__)
        else:
            parts.append(f"{name}{index}")
    return "-".join(parts)


def _cases(function: Any) -> Dict[str, bool]:
    """The ids of a parametrized test's cases, each with whether it is marked slow."""
    axes = []
    for mark in _marks(function):
        if mark.name != "parametrize":
            continue
        argnames = mark.args[0]
        argnames = [n.strip() for n in argnames.split(",")] if isinstance(argnames, str) else list(argnames)
        ids = mark.kwargs.get("ids")
        ids = list(ids) if ids is not None and not callable(ids) else None
        axis = []
        for index, value in enumerate(mark.args[1]):
            is_set = hasattr(value, "values") and hasattr(value, "marks") and hasattr(value, "id")
            marks = [getattr(m, "mark", m) for m in value.marks] if is_set else []
            inner = (value.values if len(argnames) > 1 else value.values[0]) if is_set else value
            case_id = (value.id if is_set and value.id else ids[index] if ids
                       else _param_id(inner, argnames, index))
            axis.append((case_id, any(m.name == "slow" for m in marks)))
        axes.append(axis)
    return {"-".join(i for i, _ in combo): any(s for _, s in combo) for combo in product(*axes)}


def resolve(node_id: str) -> Tuple[bool, str]:
    """(whether the test runs only under ``-m slow``, "") if ``node_id`` names a test that exists,
    else (False, what is missing)."""
    match = re.fullmatch(r"(tests/test_\w+\.py)::(?:(\w+)::)?(test_\w+)(?:\[(.+)\])?", node_id)
    if not match:
        return False, "not a node id of the form tests/test_x.py::[Class::]test_name[case]"
    path, cls_name, name, case = match.groups()
    if not (ROOT / path).exists():
        return False, f"no file {path}"
    try:
        module = _test_module(path)
    except pytest.skip.Exception:  # the module skips itself here (a missing optional package)
        tree = ast.parse((ROOT / path).read_text())
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
        return False, "" if name in defined else f"no test {name} in {path}"
    owner = getattr(module, cls_name, None) if cls_name else module
    function = getattr(owner, name, None)
    if function is None or not callable(function):
        return False, f"no test {name} in {path}"
    slow = any(m.name == "slow" for m in _marks(module) + _marks(owner) + _marks(function))
    if case is not None:
        cases = _cases(function)
        if case not in cases:
            return False, f"{name} has no case [{case}] (cases: {', '.join(cases) or 'none'})"
        slow = slow or cases[case]
    return slow, ""


def test_every_anchor_is_in_one_block_of_its_document():
    missing = [f"{row.doc}: {row.anchor!r}" for row in CLAIMS if block_of(row) is None]
    assert missing == [], "not found, or found in more than one paragraph, item or row: make the " \
                          "anchor follow the document's wording and be unique"


def test_every_claim_has_a_test_or_says_where_it_comes_from():
    assert [row.anchor for row in CLAIMS if not row.tests and row.source is None] == []


def test_every_listed_test_exists():
    problems = [f"{node}: {problem}" for row in CLAIMS for node in row.tests
                for problem in [resolve(node)[1]] if problem]
    assert problems == []


def test_claims_checked_only_by_slow_tests_say_so_where_they_are_made():
    unsaid, fixed = [], []
    for row in CLAIMS:
        block = block_of(row) or ""
        slow = [node for node in row.tests if resolve(node)[0]]
        says = re.search(SLOW_WORDING, block) is not None
        if slow and not says and not row.pending:
            unsaid.append(f"{row.doc}: {row.anchor!r} is checked only under -m slow by {slow}")
        if row.pending and (says or not slow):
            fixed.append(f"{row.anchor!r}: its wording is right now; drop pending=")
    assert unsaid == [] and fixed == []


def test_claims_from_a_source_say_where_they_come_from():
    unsaid = [f"{row.doc}: {row.anchor!r} should say it is {row.source.what}" for row in CLAIMS
              if row.source is not None and not re.search(row.source.wording, block_of(row) or "")]
    assert unsaid == []


def test_the_checks_catch_a_missing_test_a_missing_case_and_slow_cases():
    assert resolve(SELF + "test_every_listed_test_exists") == (False, "")
    assert "no test" in resolve(SELF + "test_no_such_test")[1]
    assert "no file" in resolve(T + "test_no_such_file.py::test_x")[1]
    assert resolve(PARITY + "[torchvision_resnet50]") == (True, "")
    assert resolve(PARITY + "[timm_resnet10t]") == (False, "")
    assert "no case" in resolve(PARITY + "[no_such_model]")[1]
    assert resolve(SOAK + "test_running_stats_stay_bitwise_identical_across_ranks_and_match_float64_replay")[0]
    assert resolve(DIST + "test_three_ranks_equal_float64_batchnorm_on_the_global_batch[uneven_batches-gloo]") \
        == (False, "")
