"""A package replaced on disk after it was loaded is never served under the old name: restarts
and replicas refuse it."""

import os
import signal
import time

import numpy as np
import pytest

import models
import ope


def _two_versions(root):
    """Two builds of a package named "swapped" (y = x + 1, then y = x + 2): the deployed one
    and the next, as (path, path)."""
    source = "def factory(d):\n    return lambda x: {{'y': x + {}}}\n"
    return tuple(models.numpy_package(str(root / folder), source.format(add), name="swapped",
                                      inputs=[ope.TensorSpec("x", "int64", ())],
                                      outputs=[ope.TensorSpec("y", "int64", ())]).path
                 for folder, add in (("deployed", 1), ("upcoming", 2)))


def _deploy(path, replacement):
    """Replace the package folder at ``path``, as a deployment does: by renames."""
    os.rename(path, path + ".previous")
    os.rename(replacement, path)


def _answer(model):
    return int(model.infer({"x": np.array(10)})["y"])


def test_a_restart_refuses_a_package_replaced_on_disk_since_it_was_loaded(open_model, tmp_path):
    path, upcoming = _two_versions(tmp_path)
    model = open_model(path)
    assert _answer(model) == 11
    _deploy(path, upcoming)
    assert _answer(model) == 11  # the running worker goes on with what it loaded
    os.kill(model.health()["pid"], signal.SIGKILL)
    with pytest.raises(ope.WorkerCrashed):
        _answer(model)
    with pytest.raises(ope.PackageError, match=f"package at {path} changed on disk since it "
                                               f"was loaded \\(manifest digest: expected "):
        _answer(model)  # the restart reads the new folder, and refuses it
    assert "changed on disk" in model.health()["failures"][-1]["reason"]
    with pytest.raises((ope.PackageError, ope.ModelBroken)):
        _answer(model)


def test_a_restart_refuses_a_link_added_to_the_package_since_it_was_loaded(open_model, tmp_path):
    path = _two_versions(tmp_path)[0]
    model = open_model(path)
    # A linked folder code/model/ would be imported before code/model.py; the manifest,
    # and so its digest, do not change.
    outside = tmp_path / "outside" / "model"
    outside.mkdir(parents=True)
    (outside / "__init__.py").write_text("def factory(d):\n    return lambda x: {'y': x * 0}\n")
    os.symlink(outside, os.path.join(path, "code", "model"))
    os.kill(model.health()["pid"], signal.SIGKILL)
    with pytest.raises(ope.WorkerCrashed):
        _answer(model)
    with pytest.raises(ope.PackageError, match="code/model is a symbolic link"):
        _answer(model)


def test_replicas_never_serve_a_package_replaced_on_disk(open_model, tmp_path):
    path, upcoming = _two_versions(tmp_path)
    model = open_model(path, replicas=2)
    assert {_answer(model) for _ in range(4)} == {11}
    _deploy(path, upcoming)

    def answers(calls):
        seen = []
        for _ in range(calls):
            try:
                seen.append(_answer(model))
            except ope.OpeError as exc:
                seen.append(type(exc))
        return seen

    def refused_restart():
        failures = model.health()["replicas"][0]["failures"]
        return any("changed on disk" in failure["reason"] for failure in failures)

    first, second = (replica["pid"] for replica in model.health()["replicas"])
    os.kill(first, signal.SIGKILL)
    seen = answers(20)
    assert 11 in seen and 12 not in seen  # the other replica serves; the killed one never
    deadline = time.monotonic() + 30
    while not refused_restart() and time.monotonic() < deadline:  # restarts run eagerly
        time.sleep(0.02)  # polling a state another thread changes; not synchronising work
    assert refused_restart()
    os.kill(second, signal.SIGKILL)
    seen += answers(10)
    assert 12 not in seen and ope.PackageError in seen
