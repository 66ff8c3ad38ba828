"""The first answer after a crash, without and with a standby worker.

    python bench/bench_recovery.py [--rounds N]

For a numpy model (the tests' fault package, a python package) and a TorchScript model
(tests/models.py's GatedPolicy), each loaded with ``standby=0`` and ``standby=1``: the
serving worker is SIGKILLed from outside while idle, and calls are made at once, one after
another, until one is answered; the time from the kill to that answer. A call sent to the dead
worker raises WorkerCrashed (never retried by ope) and the next one is made; their number is
printed too. The four columns alternate ABBA round by round; before each kill every model has
answered an untimed call and, with a standby, its standby is loaded again (not timed).
"""

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time

import numpy as np

import ope

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from fault_package import fault_inputs, fault_package, wait_for  # noqa: E402
import models  # noqa: E402  (the tests' model builders)


def _first_answer_ms(model, inputs):
    """(ms from SIGKILL of the idle worker to the first answer, calls that met the crash)."""
    model.infer(inputs)  # untimed: the worker is awake and the model warm
    pid = model.stats()["pid"]
    crashed = 0
    start = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    while True:
        try:
            model.infer(inputs)
            return (time.perf_counter() - start) * 1e3, crashed
        except ope.WorkerCrashed:
            crashed += 1


def _wait_for_standby(model):
    if model.health()["standby"]["wanted"]:
        assert wait_for(lambda: model.health()["standby"]["ready"] == 1, 60.0, poll_s=0.01), \
            model.health()["standby"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as root:
        kinds = {
            "numpy (python package)": (fault_package(root), fault_inputs("ok")),
            "torch (TorchScript)": (models.torchscript_package(root).path,
                                    {"obs": np.linspace(-3, 3, 12, dtype=np.float32)
                                     .reshape(3, 4), "gain": np.array(5.0, np.float32)}),
        }
        results = {}
        for kind, (path, inputs) in kinds.items():
            loaded = {standby: ope.load(path, out_of_process=True, standby=standby,
                                        max_restarts=10_000) for standby in (0, 1)}
            samples = {0: [], 1: []}
            try:
                for round_ in range(args.rounds):
                    for standby in ((0, 1) if round_ % 2 == 0 else (1, 0)):  # ABBA
                        model = loaded[standby]
                        _wait_for_standby(model)
                        samples[standby].append(_first_answer_ms(model, inputs))
            finally:
                for model in loaded.values():
                    model.close()
            results[kind] = samples
    print()
    print(f"{'first answer after SIGKILL (ms)':34s} {'standby=0':>12s} {'standby=1':>12s} "
          f"{'ratio':>8s}   calls that met the crash (0 / 1)")
    for kind, samples in results.items():
        plain = statistics.median(ms for ms, _ in samples[0])
        standby = statistics.median(ms for ms, _ in samples[1])
        met = [sum(n for _, n in samples[s]) / len(samples[s]) for s in (0, 1)]
        print(f"{kind:34s} {plain:10.1f}   {standby:10.1f}   {plain / standby:7.1f}x   "
              f"{met[0]:.1f} / {met[1]:.1f} per round  (max with standby "
              f"{max(ms for ms, _ in samples[1]):.1f} ms, n={len(samples[1])})")


if __name__ == "__main__":
    main()
