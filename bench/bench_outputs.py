"""Outputs without a copy: the add-one model's round trip with a model.empty input, out of
process against in process, side by side.

    python bench/bench_outputs.py [--rounds N] [--sizes 1,16,64] [--torch]

Columns, per size (MiB of float32), alternating in ABBA chunks:

- in process, ``x + 1`` (the model returns a new array);
- out of process, outputs copied into the arena (the memory hook off: OPE_ARENA_OUTPUTS=0);
- out of process, outputs born in the arena (the default);
- in process and out of process with the ``out=`` model (``np.add(x, 1, out=out["y"])``).

Prints medians of chunk medians, the ratios to the in-process column of the same model, the
bytes copied out per call, the load average, and the arena's reservation before, during and
after a burst of held 64 MiB outputs. With ``--torch``: the same for a torch model.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

import ope
from ope import TensorSpec

_ADD = '''
def factory(data_dir):
    def add_one(x):
        return {"y": x + 1}
    return add_one
'''
_OUT = '''
import numpy as np


def factory(data_dir):
    def add_one(x, out=None):
        if out is None:
            return {"y": x + 1}
        np.add(x, 1, out=out["y"])
    return add_one
'''
_TORCH = '''
import torch


def factory(data_dir):
    def add_one(x):
        return {"y": x + 1}
    return add_one
'''
_MIB = 1 << 20


def build(root, name, source, framework="numpy"):
    code = os.path.join(root, name + "-code")
    os.makedirs(code)
    with open(os.path.join(code, "model.py"), "w") as f:
        f.write(source)
    return ope.package_python(os.path.join(root, name), name=name, code_dir=code,
                              entrypoint="model:factory", framework=framework,
                              inputs=[TensorSpec("x", "float32", ("n",))],
                              outputs=[TensorSpec("y", "float32", ("n",))]).path


def chunk(call, seconds):
    """Median µs of calls for ``seconds`` (at least 3), after one untimed call."""
    call()
    times, end = [], time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < end:
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
    return sorted(times)[len(times) // 2] / 1e3


def columns(packages, nbytes):
    """name -> (model, call) for one size."""
    n = nbytes // 4
    x = np.ones(n, np.float32)
    made = {}

    def add(name, path, out_of_process, **options):
        model = ope.load(path, out_of_process=out_of_process, **options)
        arg = model.empty("x", (n,)) if out_of_process else x
        if out_of_process:
            arg[...] = 1
        model.infer({"x": arg})  # the first output is copied: the worker's arena grows for it
        made[name] = (model, lambda: model.infer({"x": arg}))

    add("in process", packages["add"], False)
    add("oop, copied", packages["add"], True, env_vars={"OPE_ARENA_OUTPUTS": "0"})
    add("oop, born in arena", packages["add"], True)
    add("in process, out=", packages["out"], False)
    add("oop, out=", packages["out"], True)
    if "torch" in packages:
        add("torch in process", packages["torch"], False)
        add("torch oop", packages["torch"], True)
    return made


def measure(made, rounds, seconds):
    names = list(made)
    medians = {name: [] for name in names}
    copied = {name: made[name][0].stats()["bytes_copied_out"] for name in names}
    calls = {name: made[name][0].stats()["calls"] for name in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            medians[name].append(chunk(made[name][1], seconds))
    per_call = {}
    for name in names:
        stats = made[name][0].stats()
        per_call[name] = (stats["bytes_copied_out"] - copied[name]) / max(1, stats["calls"] - calls[name])
    return {name: float(np.median(m)) for name, m in medians.items()}, per_call


def report(size_mib, medians, per_call):
    base = {"in process": medians["in process"], "in process, out=": medians["in process, out="],
            "torch in process": medians.get("torch in process")}
    print(f"\n{size_mib} MiB   (load average {os.getloadavg()[0]:.1f})")
    print(f"  {'column':24} {'median µs':>10} {'ratio':>7} {'copied out/call':>16}")
    for name, value in medians.items():
        ref = base["torch in process"] if name.startswith("torch") else \
            base["in process, out="] if "out=" in name else base["in process"]
        print(f"  {name:24} {value:10,.0f} {value / ref:7.2f} {per_call[name]:16,.0f}")


def burst(packages):
    """The arena's reservation (host's own segments, the worker's as the host maps them)."""
    model = ope.load(packages["add"], out_of_process=True)

    def line(when):
        s = model.stats()
        print(f"  {when:34} host {s['arena_bytes_reserved'] / _MIB:7.1f} MiB   "
              f"worker {s['arena_bytes_worker'] / _MIB:7.1f} MiB   in use "
              f"{s['arena_bytes_in_use'] / _MIB:7.1f} MiB")

    print("\nArena reservation around a burst of 8 held 64 MiB outputs")
    line("before")
    held = [model.infer({"x": np.full(16 * _MIB, i, np.float32)})["y"] for i in range(8)]
    line("during (outputs held)")
    kept = held[0]
    del held
    time.sleep(3)
    line("3 s after, one output still held")
    assert (kept == 1).all()
    del kept
    time.sleep(3)
    line("3 s after the last is dropped")
    model.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="chunks per column and size")
    parser.add_argument("--chunk-s", type=float, default=0.3)
    parser.add_argument("--sizes", default="1,16,64", help="MiB")
    parser.add_argument("--torch", action="store_true", help="also a torch model")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="bench_outputs-")
    packages = {"add": build(root, "add", _ADD), "out": build(root, "out", _OUT)}
    if args.torch:
        packages["torch"] = build(root, "torch_add", _TORCH, framework="torch")
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, {os.cpu_count()} CPUs")
    for size in (int(s) for s in args.sizes.split(",")):
        made = columns(packages, size * _MIB)
        try:
            report(size, *measure(made, args.rounds, args.chunk_s))
        finally:
            for model, _ in made.values():
                model.close()
    burst(packages)


if __name__ == "__main__":
    main()
