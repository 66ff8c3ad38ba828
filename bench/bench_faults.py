"""How fast the supervisor turns each fault into an error, and what recovery costs.

    python bench/bench_faults.py [--rounds N]

Measured on the real path, with the fault-injection package of the test suite:
- crash while a call is blocked: the worker is SIGKILLed from outside mid-call; time from the
  kill to WorkerCrashed in the caller (bound: 100 ms);
- idle death: the worker is SIGKILLed while no call waits on it; time from the kill to the
  failure showing in ``health()`` (bound: 100 ms), and, with ``restart="eager"``, to a new
  worker being ready;
- crash inside the call (os._exit): time from the call's start to WorkerCrashed, less the
  round trip of a healthy call; again with a helper process the model started (which holds
  the worker's output pipe and must die with it);
- deadline: how far past ``timeout_s`` WorkerTimeout arrives (the ladder's SIGTERM included);
  again with a helper process;
- memory limit: from the worker's start of ballooning to MemoryLimitExceeded;
- garbage: the model writes random bytes over every arena segment it maps; extra time of that
  call to ProtocolError, and the first call after it (a fresh worker and control segment);
- host death: from SIGKILL of a host process to its worker's exit (bound: 1 s); the same from
  a host's exec of another program;
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
from fault_package import fault_inputs, fault_package  # noqa: E402  (the tests' fault package)


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


def idle_death(path, rounds, restart="lazy"):
    """ms from SIGKILL of an idle worker to its failure in health(); with restart="eager", to
    the new worker being ready."""
    samples = []
    with ope.load(path, out_of_process=True, max_restarts=10_000, restart=restart) as model:
        for _ in range(rounds):
            model.infer(fault_inputs("ok"))  # a worker is there, and idle
            pid, failures = model.health()["pid"], len(model.health()["failures"])
            killed = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            while True:
                health = model.health()
                seen = len(health["failures"]) > failures
                if seen and (restart == "lazy" or health["state"] == "ready"):
                    break
                time.sleep(0.001)
            samples.append((time.perf_counter() - killed) * 1e3)
    return samples


def _time_to_error(path, rounds, fault, error, helper=False, **options):
    """Per round: a healthy call (its time is the baseline; with ``helper`` it starts a
    process that never stops), then the faulty call; returns the faulty call's time to
    ``error`` less the baseline, in ms."""
    samples = []
    with ope.load(path, out_of_process=True, max_restarts=10_000, **options) as model:
        for _ in range(rounds):
            model.infer(fault_inputs("ok"))  # the first call after a fault starts a worker
            if helper:
                model.infer(fault_inputs("spawn"))
            start = time.perf_counter()
            model.infer(fault_inputs("ok"))
            baseline = time.perf_counter() - start
            start = time.perf_counter()
            try:
                model.infer(fault_inputs(fault))
            except error:
                samples.append((time.perf_counter() - start - baseline) * 1e3)
    return samples


def crash_in_call(path, rounds, helper=False):
    return _time_to_error(path, rounds, "exit3", ope.WorkerCrashed, helper)


def deadline_overshoot(path, rounds, timeout_s=0.2, helper=False):
    samples = _time_to_error(path, rounds, "spin", ope.WorkerTimeout, helper, timeout_s=timeout_s)
    return [ms - timeout_s * 1e3 for ms in samples]


def memory_limit(path, rounds, limit_mb=200):
    return _time_to_error(path, rounds, "balloon", ope.MemoryLimitExceeded, memory_limit_mb=limit_mb)


def arena_garbage(path, rounds):
    return _time_to_error(path, rounds, "garbage_everywhere", ope.ProtocolError)


def restart_cost(path, rounds, fault="sigkill", error=ope.WorkerCrashed):
    samples = []
    with ope.load(path, out_of_process=True, max_restarts=10_000) as model:
        for _ in range(rounds):
            try:
                model.infer(fault_inputs(fault))
            except error:
                pass
            start = time.perf_counter()
            model.infer(fault_inputs("ok"))
            samples.append((time.perf_counter() - start) * 1e3)
    return samples


_HOST = textwrap.dedent('''
    import os, sys, time, ope, numpy as np
    sys.path.insert(0, {tests!r})
    from fault_package import fault_inputs
    model = ope.load({path!r}, out_of_process=True)
    print(model.stats()["pid"], flush=True)
    if {exec_!r}:
        time.sleep(0.2)
        print(time.monotonic(), flush=True)  # CLOCK_MONOTONIC: the same clock in every process
        os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)"])
    model.infer(fault_inputs("sleep", x=(60.0,)))
''')


def host_death(path, rounds, exec_=False):
    """ms from the host's SIGKILL (or its exec of another program) to its worker's exit."""
    samples, leftovers = [], 0
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
    for _ in range(rounds):
        script = _HOST.format(tests=tests, path=path, exec_=exec_)
        host = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        worker = psutil.Process(int(host.stdout.readline()))
        if exec_:
            start = float(host.stdout.readline())
        else:
            time.sleep(0.2)  # the call is in flight
            start = time.monotonic()
            host.kill()
        _wait_dead(worker)
        samples.append((time.monotonic() - start) * 1e3)
        host.kill()
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
            ("idle death seen (kill -> health)", idle_death(path, args.rounds), 100),
            ("  restart='eager': kill -> new worker ready",
             idle_death(path, args.rounds, "eager"), None),
            ("crash inside the call (extra time)", crash_in_call(path, args.rounds), 100),
            ("  the same, the model started a helper", crash_in_call(path, args.rounds, True), 100),
            ("deadline overshoot (past timeout_s)", deadline_overshoot(path, args.rounds), None),
            ("  the same, the model started a helper",
             deadline_overshoot(path, args.rounds, helper=True), None),
            ("memory limit 200 MB (call start -> error)", memory_limit(path, args.rounds), None),
            ("first call after a crash (fresh worker)", restart_cost(path, args.rounds), None),
            ("garbage in the arena (extra time to error)", arena_garbage(path, args.rounds), 100),
            ("first call after garbage (fresh worker)",
             restart_cost(path, args.rounds, "garbage_everywhere", ope.ProtocolError), None),
        ]
        death, leftovers = host_death(path, max(3, args.rounds // 2))
        rows.append(("host SIGKILL -> worker gone", death, 1000))
        death, left = host_death(path, max(3, args.rounds // 2), exec_=True)
        rows.append(("host exec -> worker gone", death, 1000))
        leftovers += left
    print()
    for name, samples, bound in rows:
        verdict = "" if bound is None else (
            f"  bound {bound} ms: {'OK' if max(samples) <= bound else 'MISSED'}")
        print(f"{name:44s} {_summary(samples)}{verdict}")
    print(f"names left in /dev/shm by killed hosts: {leftovers}")


if __name__ == "__main__":
    main()
