"""How fast the supervisor turns each fault into an error, and what recovery costs.

    python bench/bench_faults.py [--rounds N]

Measured on the real path, with the fault-injection package of the test suite:
- crash while a call is blocked: the worker is SIGKILLed from outside mid-call; time from the
  kill to WorkerCrashed in the caller (bound: 100 ms);
- crash inside the call (os._exit): time from the call's start to WorkerCrashed, less the
  round trip of a healthy call;
- deadline: how far past ``timeout_s`` WorkerTimeout arrives (the ladder's SIGTERM included);
- memory limit: from the worker's start of ballooning to MemoryLimitExceeded;
- host death: from SIGKILL of a host process to its worker's exit (bound: 1 s);
- restart: the first call after a crash, which starts a fresh worker.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import psutil

import ope

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from faults import fault_inputs, fault_package  # noqa: E402  (the tests' fault package)


def _summary(samples_ms):
    samples_ms = sorted(samples_ms)
    return (f"median {statistics.median(samples_ms):8.1f} ms   max {samples_ms[-1]:8.1f} ms   "
            f"(n={len(samples_ms)})")


def crash_while_blocked(path, rounds):
    samples = []
    with ope.load(path, out_of_process=True, max_restarts=10_000) as model:
        for _ in range(rounds):
            model.infer(fault_inputs("ok"))
            pid = model.stats()["pid"]
            killed_at = []

            def kill_soon():
                time.sleep(0.05)  # let the call reach the worker: this is the fault's timing
                killed_at.append(time.perf_counter())
                os.kill(pid, signal.SIGKILL)

            killer = threading.Thread(target=kill_soon)
            killer.start()
            try:
                model.infer(fault_inputs("sleep", x=(10.0,)))
            except ope.WorkerCrashed:
                samples.append((time.perf_counter() - killed_at[0]) * 1e3)
            killer.join()
    return samples


def _time_to_error(path, rounds, fault, error, **options):
    """Per round: a healthy call (its time is the baseline), then the faulty call; returns the
    faulty call's time to ``error`` less the baseline, in ms."""
    samples = []
    with ope.load(path, out_of_process=True, max_restarts=10_000, **options) as model:
        for _ in range(rounds):
            model.infer(fault_inputs("ok"))  # the first call after a fault starts a worker
            start = time.perf_counter()
            model.infer(fault_inputs("ok"))
            baseline = time.perf_counter() - start
            start = time.perf_counter()
            try:
                model.infer(fault_inputs(fault))
            except error:
                samples.append((time.perf_counter() - start - baseline) * 1e3)
    return samples


def crash_in_call(path, rounds):
    return _time_to_error(path, rounds, "exit3", ope.WorkerCrashed)


def deadline_overshoot(path, rounds, timeout_s=0.2):
    samples = _time_to_error(path, rounds, "spin", ope.WorkerTimeout, timeout_s=timeout_s)
    return [ms - timeout_s * 1e3 for ms in samples]


def memory_limit(path, rounds, limit_mb=200):
    return _time_to_error(path, rounds, "balloon", ope.MemoryLimitExceeded, memory_limit_mb=limit_mb)


def restart_cost(path, rounds):
    samples = []
    with ope.load(path, out_of_process=True, max_restarts=10_000) as model:
        for _ in range(rounds):
            try:
                model.infer(fault_inputs("sigkill"))
            except ope.WorkerCrashed:
                pass
            start = time.perf_counter()
            model.infer(fault_inputs("ok"))
            samples.append((time.perf_counter() - start) * 1e3)
    return samples


_HOST = textwrap.dedent('''
    import sys, ope, numpy as np
    sys.path.insert(0, {tests!r})
    from faults import fault_inputs
    model = ope.load({path!r}, out_of_process=True)
    print(model.stats()["pid"], flush=True)
    model.infer(fault_inputs("sleep", x=(60.0,)))
''')


def host_death(path, rounds):
    samples, leftovers = [], 0
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
    for _ in range(rounds):
        host = subprocess.Popen([sys.executable, "-c", _HOST.format(tests=tests, path=path)],
                                stdout=subprocess.PIPE, text=True)
        worker = psutil.Process(int(host.stdout.readline()))
        time.sleep(0.2)  # the call is in flight
        start = time.perf_counter()
        host.kill()
        _wait_dead(worker)
        samples.append((time.perf_counter() - start) * 1e3)
        host.wait()
        host.stdout.close()
        leftovers += len([n for n in os.listdir("/dev/shm") if n.startswith(f"ope-{host.pid}-")])
    return samples, leftovers


def _wait_dead(proc, timeout_s=10.0):
    """Until ``proc`` has exited. An orphan stays a zombie until this machine's init reaps
    it, which can take a second here; a zombie runs nothing and holds no memory."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.002)
    raise TimeoutError(f"worker {proc.pid} still running")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as root:
        path = fault_package(root)
        rows = [
            ("crash while blocked (kill -> error)", crash_while_blocked(path, args.rounds), 100),
            ("crash inside the call (extra time)", crash_in_call(path, args.rounds), 100),
            ("deadline overshoot (past timeout_s)", deadline_overshoot(path, args.rounds), None),
            ("memory limit 200 MB (call start -> error)", memory_limit(path, args.rounds), None),
            ("first call after a crash (fresh worker)", restart_cost(path, args.rounds), None),
        ]
        death, leftovers = host_death(path, max(3, args.rounds // 2))
        rows.append(("host SIGKILL -> worker gone", death, 1000))
    print()
    for name, samples, bound in rows:
        verdict = "" if bound is None else (
            f"  bound {bound} ms: {'OK' if max(samples) <= bound else 'MISSED'}")
        print(f"{name:44s} {_summary(samples)}{verdict}")
    print(f"segments left by killed hosts: {leftovers}")


if __name__ == "__main__":
    main()
