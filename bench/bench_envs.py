"""Time to a ready worker environment for a numpy-1 lock on Python 3.10.

Cold builds with uv and with venv + pip alternate, each in a fresh ``$OPE_HOME`` (the tools'
own download caches stay warm: that is the common case on a machine that built one before);
then warm reuse (:func:`ope.envs.ensure_env` on an existing environment) and the size on
disk of each. Run from the source tree: ``python3 bench/bench_envs.py [--rounds N]``.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ope import envs  # noqa: E402


def cold(lock_text, tool):
    with tempfile.TemporaryDirectory(prefix="ope-bench-home-") as home:
        os.environ[envs.HOME_ENV] = home
        os.environ[envs.TOOL_ENV] = tool
        start = time.perf_counter()
        env = envs.ensure_env(lock_text, progress=lambda line: None)
        elapsed = time.perf_counter() - start
        warm = []
        for _ in range(20):
            start = time.perf_counter()
            envs.ensure_env(lock_text, build=False)
            warm.append(time.perf_counter() - start)
        return elapsed, statistics.median(warm), envs.size_on_disk(env)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    lock_text = envs.lock(["numpy<2"], "3.10")
    print(f"lock: {', '.join(envs.lock_pins(lock_text))}")
    results = {"uv": [], "pip": []}
    for _ in range(args.rounds):
        for tool in results:
            results[tool].append(cold(lock_text, tool))
    print(f"{'tool':<5} {'cold build s (each)':<24} {'warm ensure ms':>15} {'size MB':>8}")
    for tool, runs in results.items():
        colds = " ".join(f"{run[0]:.1f}" for run in runs)
        print(f"{tool:<5} {colds:<24} {statistics.median(r[1] for r in runs) * 1e3:>15.2f} "
              f"{statistics.median(r[2] for r in runs) / 1e6:>8.1f}")


if __name__ == "__main__":
    main()
