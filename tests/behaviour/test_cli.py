"""The ope command: inspect, check and demo, through main(argv) and the console script."""

import shutil
import subprocess
import sys

import pytest

from ope.cli import main
from ope.demo import ACTIONS

import models

pytestmark = models.USES_TORCHSCRIPT


def test_inspect_shows_specs_requires_and_files(capsys, gated):
    assert main(["inspect", gated.path]) == 0
    out = capsys.readouterr().out
    assert "package   gated" in out and "runner    torchscript" in out
    assert "obs              float32  [batch, 4]" in out
    assert "gain             float32  []" in out
    assert "torch (any version)" in out
    assert "model.pt" in out and "config.json" in out


def test_inspect_flags_unmet_requirements(capsys, tmp_path):
    package = models.numpy_package(str(tmp_path), "def factory(d):\n    return dict\n",
                                   name="needy", inputs=[], outputs=[], lock=False,
                                   requires={"numpy": "<1"})
    assert main(["inspect", package.path]) == 0
    assert "numpy<1   [not satisfied here]" in capsys.readouterr().out


def test_check_runs_the_stored_test_data(capsys, eager):
    assert main(["check", eager.path]) == 0
    out = capsys.readouterr().out
    assert "manifest verified" in out and "output 'y': float32 [2, 2] matches" in out
    assert "self-check passed" in out


def test_check_without_test_data_fails(capsys, placeholder):
    assert main(["check", placeholder.path]) == 1
    assert "has no test data" in capsys.readouterr().err


def test_errors_are_one_line_and_exit_1(capsys, tmp_path, affine):
    broken = tmp_path / "broken"
    shutil.copytree(affine.path, broken)
    (broken / "code" / "model.py").write_text("tampered\n")
    assert main(["inspect", str(broken)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ope: error: ") and "hash mismatch for code/model.py" in err


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as caught:
        main([])
    assert caught.value.code == 2


def test_demo_runs_end_to_end():
    result = subprocess.run([sys.executable, "-m", "ope.cli", "demo"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "self-check against stored test data passed" in result.stdout
    assert "cartpole-policy: 50 calls, 0 errors" in result.stdout
    rows = [line for line in result.stdout.splitlines()
            if any(f" {action} " in line for action in ACTIONS)]
    assert len(rows) == 6, result.stdout
