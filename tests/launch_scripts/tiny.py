"""A rank that needs no torch (fast to start), for the launcher's process handling tests.

    tiny.py MODE [ARG]

exit CODE      rank 1 exits with CODE at once; the others sleep until stopped
hang MARKER    every rank starts a grandchild, prints "ready PID", and sleeps; MARKER (a unique
               string in every command line) lets the test find survivors in /proc
lines          partial writes and many lines on stdout and stderr
"""
import os
import subprocess
import sys
import time

mode = sys.argv[1]
rank = int(os.environ.get("RANK", os.environ.get("PMI_RANK", "-1")))

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
