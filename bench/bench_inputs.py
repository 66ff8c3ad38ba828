"""What keeping a torch model's inputs read-only costs in process, side by side.

    python bench/bench_inputs.py [--pairs 10]

torch ignores numpy's read-only flag, so in process a torch runner hands its model tensors
over copies of the caller's arrays (ope/runners/torch_tensors.py); out of process it hands
tensors over the worker's copy-on-write view and copies nothing. This times the runner of an eager torch
add-one model both ways on the same arrays, in alternating chunks (ABBA): "protected" is what
ope does in process, "shared" a tensor straight over the caller's array, which a model could
rewrite. Ratios are protected / shared.
"""

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

import ope
from ope.runners import load_runner

_SOURCE = "def factory(data_dir):\n    return lambda x: {'y': x + 1}\n"
SIZES = [16, 64 << 10, 1 << 20, 16 << 20, 64 << 20]


def _package(root):
    os.makedirs(f"{root}/code")
    with open(f"{root}/code/add_one.py", "w") as f:
        f.write(_SOURCE)
    spec = [ope.TensorSpec("x", "float32", ("n",))]
    return ope.package_python(f"{root}/pkg", name="add-one", code_dir=f"{root}/code", framework="torch",
                              entrypoint="add_one:factory", inputs=spec,
                              outputs=[ope.TensorSpec("y", "float32", ("n",))])


def _chunk_us(runner, inputs, calls):
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        runner.run(inputs)
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        package = _package(root)
        runners = {"protected": load_runner(package), "shared": load_runner(package, True)}
        print(f"{'bytes':>10}  {'protected us':>12}  {'shared us':>10}  ratio (pairs)")
        for nbytes in SIZES:
            x = np.ones(nbytes // 4, np.float32)
            x.flags.writeable = False  # what InProcessModel hands a runner
            inputs, calls = {"x": x}, 2000 if nbytes <= 64 << 10 else 5 if nbytes >= 16 << 20 else 50
            medians = {"protected": [], "shared": []}
            for pair in range(args.pairs):
                for name in ("protected", "shared") if pair % 2 == 0 else ("shared", "protected"):
                    medians[name].append(_chunk_us(runners[name], inputs, calls))
            ratios = [a / b for a, b in zip(medians["protected"], medians["shared"])]
            print(f"{nbytes:>10}  {statistics.median(medians['protected']):12.1f}  "
                  f"{statistics.median(medians['shared']):10.1f}  "
                  f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
