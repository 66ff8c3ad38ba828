"""How an environment build shows its progress: a bar redrawn in place on a terminal, one
line per step otherwise (a log file or CI output keeps every line)."""

import sys

__all__ = ["progress_reporter", "BUILD_STEPS"]

# The steps a build from a lock reports (ope/envs/build.py), in order.
BUILD_STEPS = ("building", "venv created", "locked packages installed", "ope installed", "ready")
_BAR_WIDTH = 20


def progress_reporter(stream=None):
    """A ``progress(line)`` callable for ope.envs.ensure_env that writes to ``stream``
    (default stderr)."""
    stream = stream or sys.stderr
    return _Bar(stream) if stream.isatty() else _Lines(stream)


class _Lines:
    def __init__(self, stream):
        self.stream = stream

    def __call__(self, line):
        print(f"ope: {line}", file=self.stream, flush=True)


class _Bar:
    """Redraws one line: a bar of the steps done so far, then the latest step's text."""

    def __init__(self, stream):
        self.stream = stream

    def __call__(self, line):
        done = next((index + 1 for index, step in enumerate(BUILD_STEPS) if f": {step}" in line),
                    0)
        filled = _BAR_WIDTH * done // len(BUILD_STEPS)
        bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
        end = "\n" if done == len(BUILD_STEPS) else ""
        self.stream.write(f"\r\x1b[Kope: [{bar}] {line}{end}")
        self.stream.flush()
