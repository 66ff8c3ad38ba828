"""Memory limits: what counts against a worker's limit (its own and its helpers' memory,
shared mappings it made) and what does not (the arena); a worker's endless output keeps the
host small."""

import os
import time

import pytest

import models
import ope
from ope import TensorSpec
from fault_package import assert_works, fault_inputs, fault_package


def test_crossing_the_memory_limit_kills_the_worker_and_raises(open_model):
    model = open_model(memory_limit_mb=150)
    pid = model.stats()["pid"]
    with pytest.raises(ope.MemoryLimitExceeded) as caught:
        model.infer(fault_inputs("balloon"))
    assert "memory_limit_mb=150" in str(caught.value)
    assert_works(model)
    assert model.stats()["pid"] != pid
    assert "memory limit" in model.health()["failures"][-1]["reason"]


def _anonymous_rss():
    """Bytes of this process's anonymous resident memory: its heap, not shared mappings."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.parametrize("when", ["load", "call"])
def test_output_without_newlines_keeps_the_host_small(open_model, package_root, caplog, when):
    path = fault_package(str(package_root), name="load_flood", load="flood") \
        if when == "load" else fault_package(str(package_root))
    name = os.path.basename(path)
    before = _anonymous_rss()
    with caplog.at_level("INFO", logger=f"ope.worker.{name}"):
        model = open_model(path)
        if when == "call":
            model.infer(fault_inputs("flood"))
        deadline = time.monotonic() + 10.0
        while not any("flood done" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the output after the flood never came"
            time.sleep(0.01)  # polling the reader thread's progress
    assert _anonymous_rss() - before < 16 << 20
    cut = [r.getMessage() for r in caplog.records if "cut: line longer" in r.getMessage()]
    assert len(cut) == 1 and len(cut[0]) < 65 << 10
    assert_works(model)


@pytest.mark.parametrize("fault", ["shared_balloon", "memfd_balloon"])
def test_shared_memory_of_the_models_own_counts_against_the_limit(open_model, fault):
    """384 MiB in a MAP_SHARED anonymous mapping or a memfd: shared memory, but not the
    arena's, so it is the worker's own."""
    model = open_model(memory_limit_mb=150)
    with pytest.raises(ope.MemoryLimitExceeded, match="memory_limit_mb=150"):
        model.infer(fault_inputs(fault))
    assert_works(model)


def test_the_arena_does_not_count_against_the_limit(open_model, package_root):
    """200 MiB in and 200 MiB out through the arena, under a 150 MiB limit."""
    path = models.echo_package(str(package_root), [TensorSpec("x", "uint8", ("n",))],
                               name="big_echo").path
    model = open_model(path, memory_limit_mb=150)
    pid = model.stats()["pid"]
    x = model.empty("x", (200 << 20,))
    x[::4096] = 7
    out = model.infer({"x": x})["echo_x"]
    time.sleep(0.5)  # several of the supervisor's checks, with both mapped in the worker
    assert out[4096] == 7 and model.stats()["pid"] == pid
    assert model.health()["private_rss_bytes"] < 150 << 20
    assert model.infer({"x": x})["echo_x"][8192] == 7
    assert model.stats()["pid"] == pid and model.health()["restarts"] == 0
