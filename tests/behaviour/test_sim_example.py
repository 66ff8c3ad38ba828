"""The example simulation job survives a worker killed mid-run and leaves nothing behind.

The job runs as a user would run it (a subprocess of its own), so its workers, segments and
exit status are those of a real job.
"""

import os
import re
import subprocess
import sys

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "sim_job.py")


def assert_nothing_left(job_output, job_pid):
    pids = [int(p) for p in re.search(r"worker pids: ([\d ]+)", job_output).group(1).split()]
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", pid
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"ope-{job_pid}-")]


@pytest.mark.parametrize("victim", ["policy", pytest.param("perception", marks=pytest.mark.slow)])
def test_the_job_reports_a_killed_worker_restarts_it_and_completes(victim):
    process = subprocess.Popen([sys.executable, EXAMPLE, "--ticks", "40", "--agents", "32",
                                "--kill-at", "15", "--kill-model", victim],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "ticks: 40 (32 agents)" in out
    assert "faults: 1 seen, 1 recovered" in out
    assert re.search(rf"tick 15: {victim}: WorkerCrashed: .*killed by SIGKILL", out)
    other = {"policy": "perception", "perception": "policy"}[victim]
    restarts = re.search(r"restarts: (.*)", out).group(1)
    assert f"{victim} 1" in restarts and f"{other} 0" in restarts
    assert f"fault at tick 15: {victim}" in err and f"recovered: {victim}" in err
    assert len(re.search(r"worker pids: ([\d ]+)", out).group(1).split()) == 3
    assert "finite: True" in out
    assert_nothing_left(out, process.pid)


@pytest.mark.slow
def test_the_job_without_faults_reports_none():
    process = subprocess.Popen([sys.executable, EXAMPLE, "--ticks", "10", "--agents", "8"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert "faults: 0 seen, 0 recovered" in out and "policy 0, perception 0" in out
    assert "10/10 ticks" in err
    assert_nothing_left(out, process.pid)
