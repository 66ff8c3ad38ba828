"""The hot path of this checkout against another one, side by side in alternating chunks.

    python bench/bench_compare.py BASE_CHECKOUT [--pairs 20] [--sizes 16,67108864]

Each checkout (its ope and built ope_native) runs in a process of its own that packages an
add-one numpy model, loads it out of process and, when asked, times a chunk of calls of one
size: ordinary arrays at 16 B, a ``model.empty`` input above 1 MiB. The chunks alternate in
ABBA order, so both sides meet the same phases of a machine whose speed drifts; per size it
prints each side's median of chunk medians and the ratio of this checkout to the base, with
the range of the per-pair ratios. Only ope's public API is used, so any two versions compare.
"""

import argparse
import os
import statistics
import subprocess
import sys
import textwrap

_SIDE = textwrap.dedent('''
    import sys, tempfile, time
    sys.path.insert(0, sys.argv[1])
    import numpy as np
    import ope

    code = tempfile.mkdtemp()
    with open(code + "/add_one.py", "w") as f:
        f.write("def factory(data_dir):\\n    return lambda x: {'y': x + 1}\\n")
    spec = [ope.TensorSpec("x", "float32", ("n",))]
    path = tempfile.mkdtemp() + "/add-one"
    ope.package_python(path, name="add-one", code_dir=code, entrypoint="add_one:factory",
                       inputs=spec, outputs=[ope.TensorSpec("y", "float32", ("n",))])
    model = ope.load(path, out_of_process=True, arena_mb=8)
    inputs = {}
    print("ready", flush=True)
    for line in sys.stdin:
        nbytes, calls = map(int, line.split())
        if nbytes not in inputs:
            n = nbytes // 4
            x = model.empty("x", (n,)) if nbytes > 1 << 20 else np.zeros(n, np.float32)
            x[...] = 1
            inputs[nbytes] = {"x": x}
            for _ in range(3):
                model.infer(inputs[nbytes])
        times = []
        for _ in range(calls):
            start = time.perf_counter_ns()
            model.infer(inputs[nbytes])
            times.append(time.perf_counter_ns() - start)
        times.sort()
        print(times[len(times) // 2] / 1e3, flush=True)
    model.close()
''')


class Side:
    """One checkout's process, timing chunks on request."""

    def __init__(self, checkout):
        self.proc = subprocess.Popen([sys.executable, "-c", _SIDE, os.path.abspath(checkout)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{checkout}: the model did not load")

    def chunk_us(self, nbytes, calls):
        self.proc.stdin.write(f"{nbytes} {calls}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(30)


def compare(base, pairs, sizes):
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sides = {"this": Side(here), "base": Side(base)}
    try:
        for nbytes in sizes:
            calls = 2000 if nbytes <= 64 << 10 else 5 if nbytes >= 16 << 20 else 50
            medians = {"this": [], "base": []}
            for pair in range(pairs):
                order = ("this", "base") if pair % 2 == 0 else ("base", "this")
                for name in order:
                    medians[name].append(sides[name].chunk_us(nbytes, calls))
            ratios = [a / b for a, b in zip(medians["this"], medians["base"])]
            print(f"{nbytes:>10} B  this {statistics.median(medians['this']):10.1f} us  "
                  f"base {statistics.median(medians['base']):10.1f} us  "
                  f"ratio {statistics.median(ratios):.3f} "
                  f"(pairs {min(ratios):.2f}-{max(ratios):.2f})", flush=True)
    finally:
        for side in sides.values():
            side.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="another checkout of ope, with ope_native built in place")
    parser.add_argument("--pairs", type=int, default=20, help="ABBA pairs of chunks per size")
    parser.add_argument("--sizes", default=f"16,{64 << 20}", help="bytes per call, comma-separated")
    args = parser.parse_args()
    compare(args.base, args.pairs, [int(s) for s in args.sizes.split(",")])


if __name__ == "__main__":
    main()
