"""ope's default paths raise no DeprecationWarning: the README's quick start and the demo run
with DeprecationWarning as an error, in this process and (through PYTHONWARNINGS, which
workers inherit) in the workers."""

import os
import re
import warnings

import pytest

import ope.demo

README = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "README.md")


def quick_start_code():
    with open(README, encoding="utf-8") as file:
        text = file.read()
    section = text.split("## Quick start", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def deprecations_are_errors(monkeypatch):
    monkeypatch.setenv("PYTHONWARNINGS", "error::DeprecationWarning")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        yield


def test_quick_start_runs_without_deprecation_warnings(tmp_path, monkeypatch, capsys,
                                                       deprecations_are_errors):
    monkeypatch.chdir(tmp_path)
    exec(compile(quick_start_code(), "README.md quick start", "exec"), {})
    out = capsys.readouterr().out
    assert "[[2. 2. 2. 2.]" in out and (tmp_path / "scale.pkg" / "model.pt2").is_file()


def test_demo_runs_without_deprecation_warnings(capsys, deprecations_are_errors):
    assert ope.demo.main() == 0
    out = capsys.readouterr().out
    assert "packaged 'cartpole-policy' (torch_export)" in out
    assert "cartpole-policy: 50 calls, 0 errors" in out
