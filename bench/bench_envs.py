"""Time to first answer for a package that needs a worker environment of its own: numpy<2
locked for Python 3.10, on a host with numpy 2.

Each round, in alternating order, a cold first answer with uv and one with venv + pip
(``ope.load`` + one ``infer``, each in a fresh ``$OPE_HOME``: the environment and ope's wheel
are built; the tools' download caches stay warm, as on a machine that built one before);
then, in the environment just built, warm first answers side by side with a package the
host's own interpreter runs (the cost of a worker start), and the environment's size on disk.
Run from the source tree: ``python3 bench/bench_envs.py [--rounds N]``.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ope  # noqa: E402
from ope import TensorSpec, envs  # noqa: E402

_SOURCE = "def factory(data_dir):\n    return lambda x: {'y': x * 2}\n"
_SPECS = dict(inputs=[TensorSpec("x", "float32", ("n",))],
              outputs=[TensorSpec("y", "float32", ("n",))])


def make_packages(root):
    code = os.path.join(root, "code")
    os.makedirs(code)
    with open(os.path.join(code, "model.py"), "w") as file:
        file.write(_SOURCE)
    common = dict(code_dir=code, entrypoint="model:factory", **_SPECS)
    locked = ope.package_python(os.path.join(root, "numpy1"), name="numpy1", python="3.10",
                                requires={"numpy": "<2"}, **common)
    host = ope.package_python(os.path.join(root, "host"), name="host", **common)
    return locked.path, host.path


def first_answer(path):
    start = time.perf_counter()
    with ope.load(path) as model:
        model.infer({"x": np.ones(4, np.float32)})
        return time.perf_counter() - start


def round_for(tool, locked, host, warm_calls):
    with tempfile.TemporaryDirectory(prefix="ope-bench-home-") as home:
        os.environ[envs.HOME_ENV] = home
        os.environ[envs.TOOL_ENV] = tool
        cold = first_answer(locked)
        warm, plain = [], []
        for _ in range(warm_calls):
            warm.append(first_answer(locked))
            plain.append(first_answer(host))
        size = sum(envs.size_on_disk(env) for env in envs.list_envs())
        return cold, statistics.median(warm), statistics.median(plain), size


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warm", type=int, default=5, help="warm first answers per round")
    args = parser.parse_args()
    os.environ[envs.BUILD_ENV] = "1"
    with tempfile.TemporaryDirectory(prefix="ope-bench-pkgs-") as root:
        locked, host = make_packages(root)
        print(f"lock: {', '.join(envs.lock_pins(ope.read_package(locked).lock_text()))}")
        results = {"uv": [], "pip": []}
        for index in range(args.rounds):
            for tool in (("uv", "pip") if index % 2 == 0 else ("pip", "uv")):
                results[tool].append(round_for(tool, locked, host, args.warm))
    print(f"{'tool':<5} {'cold first answer s':<22} {'warm first answer s':>20} "
          f"{'host worker s':>14} {'warm - host s':>14} {'size MB':>8}")
    for tool, runs in results.items():
        colds = " ".join(f"{run[0]:.1f}" for run in runs)
        warm = statistics.median(run[1] for run in runs)
        plain = statistics.median(run[2] for run in runs)
        print(f"{tool:<5} {colds:<22} {warm:>20.3f} {plain:>14.3f} {warm - plain:>14.3f} "
              f"{statistics.median(run[3] for run in runs) / 1e6:>8.1f}")
    ratio = statistics.median(r[0] for r in results["pip"]) / statistics.median(
        r[0] for r in results["uv"])
    print(f"cold first answer, pip / uv: {ratio:.2f}x")


if __name__ == "__main__":
    main()
