"""Start-up cost: ``import safeckpt`` against ``import numpy`` and its peers, side by side.

    python benchmarks/bench_import.py              # 15 rounds
    python benchmarks/bench_import.py --runs 31

Each figure is the median wall time of a fresh interpreter (``python -c <statement>``) over the
runs; the statements take turns within each round, so a busy machine slows them alike. The
interpreter's own start (``python -c pass``) is subtracted. Target (issue 10, item 11):
``import safeckpt`` within 0.15 s of ``import numpy``.
"""

import argparse
import statistics
import subprocess
import sys
import time

STATEMENTS = {
    "python": "pass",
    "numpy": "import numpy",
    "safeckpt": "import safeckpt",
    "safeckpt + open a float32 file": (
        "import numpy as np, safeckpt; "
        "safeckpt.load_bytes(safeckpt.save_bytes({'w': np.ones(4, np.float32)}))"),
    "safetensors.numpy": "import safetensors.numpy",
    "ml_dtypes": "import ml_dtypes",
}


def time_once(statement):
    """Seconds a fresh interpreter takes to run ``statement`` and exit."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="rounds (fresh processes each)")
    args = parser.parse_args()
    times = {name: [] for name in STATEMENTS}
    for _ in range(args.runs):
        for name, statement in STATEMENTS.items():
            times[name].append(time_once(statement))
    base = statistics.median(times["python"])
    median = {name: statistics.median(runs) - base for name, runs in times.items()}
    print(f"median of {args.runs} fresh processes, interpreter start ({base * 1e3:.0f} ms) "
          "subtracted\n")
    print("| import | ms | ms over numpy |")
    print("|---|---:|---:|")
    for name in STATEMENTS:
        if name != "python":
            over = median[name] - median["numpy"]
            print(f"| {name} | {median[name] * 1e3:.0f} | {over * 1e3:+.0f} |")
    over = median["safeckpt"] - median["numpy"]
    print(f"\nimport safeckpt costs {over * 1e3:.0f} ms more than import numpy "
          f"(target: at most 150 ms): {'met' if over <= 0.15 else 'NOT met'}")


if __name__ == "__main__":
    main()
