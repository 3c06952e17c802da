"""Prepares run_bench.py's model and batch for one workload and prints the batch file's path (for the shell scripts).

    python3 bench/prepare_batch.py SHAPE BATCH SEQ
"""
import sys

import run_bench

print(run_bench.prepare_batch(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))[2])
