"""syncbn.init_distributed under environments the tests give it (tests/test_distributed_init.py).

    init_cases.py cases CASES_JSON
        CASES_JSON: {"clear": [names], "cases": {name: {"env": {...}, "timeout": seconds}}}.
        One case after another in this process (one torch import for them all): the launcher
        variables in "clear" are removed, the case's set, and init_distributed(timeout=...)
        called. Prints "case NAME {json}" for each, as soon as it is known: what it raised or
        returned, any warning, and how long the call took.
    init_cases.py absent RANK TIMEOUT
        Started by a launcher: rank RANK never calls init_distributed (it sleeps); every other
        rank calls init_distributed(timeout=TIMEOUT), uncaught, and prints "rank K waited S s".
"""
import dataclasses
import json
import os
import sys
import time
import warnings

import torch.distributed as dist

import syncbn
import syncbn.distributed


def attempt(timeout: float) -> dict:
    """One init_distributed call: what it did, and how long it took."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        started = time.monotonic()
        try:
            outcome = {"info": dataclasses.asdict(syncbn.init_distributed(timeout=timeout))}
        except Exception as error:  # reported to the test, which checks the words
            outcome = {"error": f"{type(error).__name__}: {error}"}
        outcome["elapsed"] = time.monotonic() - started
    outcome["warnings"] = [str(warning.message) for warning in caught]
    outcome["group"] = dist.is_initialized()
    if dist.is_initialized():
        dist.destroy_process_group()
    syncbn.distributed._initialized = None
    return outcome


if sys.argv[1] == "cases":
    spec = json.loads(sys.argv[2])
    for name, case in spec["cases"].items():
        for variable in spec["clear"]:
            os.environ.pop(variable, None)
        os.environ.update(case["env"])
        print(f"case {name} " + json.dumps(attempt(case.get("timeout", 30))), flush=True)
elif sys.argv[1] == "absent":
    rank = os.environ["RANK"]
    if rank == sys.argv[2]:
        time.sleep(600)
    started = time.monotonic()
    try:
        syncbn.init_distributed(timeout=float(sys.argv[3]))
    finally:
        print(f"rank {rank} waited {time.monotonic() - started:.2f} s", flush=True)
