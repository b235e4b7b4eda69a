"""A rank that needs no torch (fast to start), for the launcher's process handling tests.

    tiny.py MODE [ARG]

exit CODE      rank 1 exits with CODE at once; the others sleep until stopped
hang MARKER    every rank starts a grandchild, prints "ready PID", and sleeps; MARKER (a unique
               string in every command line) lets the test find survivors in /proc
lines          partial writes and many lines on stdout and stderr
env            prints the launcher's variables as JSON: "env {...}"
raise DIR      every rank waits until all have started (files in DIR), then raises: the last
               rank a KeyError, the others "rank K: the same error" chained to its cause
signals        every rank prints "ready" and sleeps; each signal it gets is printed ("rank K got
               SIGTERM"); rank 0 then dies by it, rank 1 ignores it
"""
import json
import os
import signal
import subprocess
import sys
import time

mode = sys.argv[1]
rank = int(os.environ.get("RANK", os.environ.get("PMI_RANK", "-1")))
world = int(os.environ.get("WORLD_SIZE", os.environ.get("PMI_SIZE", "-1")))

if mode == "exit":
    if rank == 1:
        sys.exit(int(sys.argv[2]))
    time.sleep(600)
elif mode == "hang":
    marker = sys.argv[2]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker])
    print(f"ready {os.getpid()} {child.pid}", flush=True)
    time.sleep(600)
elif mode == "lines":
    for i in range(200):
        sys.stdout.write(f"out {rank} {i} ")  # a line in three writes, racing the other ranks
        sys.stdout.flush()
        sys.stdout.write("x" * (i % 7))
        sys.stdout.flush()
        sys.stdout.write(" end\n")
        sys.stdout.flush()
    print(f"err {rank}", file=sys.stderr, flush=True)
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')} WORLD_SIZE={os.environ.get('WORLD_SIZE')}"
          f" LOCAL_RANK={os.environ.get('LOCAL_RANK')} MASTER_PORT={os.environ.get('MASTER_PORT')}")
elif mode == "env":
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
             "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT",
             "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT",
             "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RUN_ID", "PMI_RANK", "PMI_SIZE")
    print("env " + json.dumps({name: os.environ.get(name) for name in names}), flush=True)
elif mode == "raise":
    folder = sys.argv[2]
    open(os.path.join(folder, f"rank{rank}"), "w").close()
    deadline = time.monotonic() + 120
    while len(os.listdir(folder)) < world and time.monotonic() < deadline:
        time.sleep(0.01)
    if rank == world - 1:
        raise KeyError("a different error")
    try:
        raise ValueError(f"rank {rank}: its cause")
    except ValueError as cause:
        raise RuntimeError(f"rank {rank}: the same error, chained") from cause
elif mode == "signals":
    def note(sig, _frame):
        print(f"rank {rank} got {signal.Signals(sig).name}", flush=True)
        if rank == 0:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, note)
    print(f"ready {os.getpid()}", flush=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        time.sleep(0.1)
