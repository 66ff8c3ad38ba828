"""What ope adds to a framework's own call, per runner: the model called directly in its
framework, through ope in process, and through ope out of process, side by side.

    python bench/bench_runners.py [--rounds 10] [--only onnx]

Each runner contributes cases (a model, its inputs, and the framework's direct call) from a
function in CASES: a 16 B call, where ope's fixed cost shows, and a call of about 1 ms (a big
MatMul), where it should vanish. Per case the three columns take their calls in chunks,
alternating in ABBA-like order (the order reverses every round, so no column always runs
first); each chunk starts after a 50 ms pause, in which the previous column's threads go idle,
and with an untimed call. Printed per case: each column's median of
chunk medians, ope's overhead per call over the direct call in process and out of process,
out of process over in process in µs and as a ratio.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ope  # noqa: E402 (this checkout's ope, not an installed one)


@dataclass
class Case:
    runner: str
    label: str
    package_path: str
    inputs: dict
    direct: Callable  # the framework's own call on ``inputs``
    calls: int  # per chunk


def onnx_cases(root):
    """onnxruntime: add-one on 4 floats, and x[32, 2048] @ w[2048, 2048] (about 1 ms of
    compute, 256 KiB in and out)."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    def case(label, nodes, x, weights, calls):
        graph = helper.make_graph(
            nodes, label, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", x.shape[1]])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [numpy_helper.from_array(array, name) for name, array in weights.items()])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        package = ope.package_onnx(os.path.join(root, f"onnx-{len(os.listdir(root))}"), model,
                                   name="bench", outputs=[ope.TensorSpec("y", "float32", ("n", None))])
        session = onnxruntime.InferenceSession(model.SerializeToString(),
                                               providers=["CPUExecutionProvider"])
        inputs = {"x": x}
        return Case("onnx", label, package.path, inputs,
                    lambda: session.run(["y"], inputs), calls)

    one = {"one": np.ones(1, np.float32)}
    weight = {"w": np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)}
    return [case("16 B", [helper.make_node("Add", ["x", "one"], ["y"])],
                 np.zeros((1, 4), np.float32), one, 2000),
            case("MatMul 32x2048x2048", [helper.make_node("MatMul", ["x", "w"], ["y"])],
                 np.ones((32, 2048), np.float32), weight, 100)]


# runner -> the function that builds its cases in a folder
CASES = {"onnx": onnx_cases}


def chunk_median_us(call, calls):
    # The previous column's threads (a framework's pool spinning after its last run, ope's
    # queue spin) go idle first: on a small machine they would take this column's cores.
    time.sleep(0.05)
    call()  # a worker idle through the other columns' chunks takes a while to wake
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def measure(case, rounds):
    """Median of chunk medians per column, in µs."""
    with ope.load(case.package_path, out_of_process=False) as in_process, \
            ope.load(case.package_path, out_of_process=True) as out_of_process:
        columns = {"direct": case.direct,
                   "in process": lambda: in_process.infer(case.inputs),
                   "out of process": lambda: out_of_process.infer(case.inputs)}
        medians = {name: [] for name in columns}
        for index in range(rounds):
            order = list(columns) if index % 2 == 0 else list(reversed(columns))
            for name in order:
                medians[name].append(chunk_median_us(columns[name], case.calls))
    return {name: statistics.median(values) for name, values in medians.items()}


def report(case, us):
    direct, inside, outside = us["direct"], us["in process"], us["out of process"]
    print(f"{case.runner:<8} {case.label:<18} {direct:9.1f} {inside:9.1f} {outside:9.1f}   "
          f"{inside - direct:+8.1f} {outside - direct:+8.1f} {outside - inside:+8.1f}   "
          f"{outside / direct:6.3f} {outside / inside:6.3f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10, help="chunks per column and case")
    parser.add_argument("--only", choices=sorted(CASES), help="one runner's cases")
    args = parser.parse_args()
    print(f"{'runner':<8} {'case':<18} {'direct':>9} {'in proc':>9} {'out proc':>9}   "
          f"{'in-dir':>8} {'out-dir':>8} {'out-in':>8}   {'out/dir':>6} {'out/in':>6}")
    print(f"{'':<27} {'median µs per call':^29}   {'ope overhead, µs':^26}   {'ratios':^13}")
    with tempfile.TemporaryDirectory() as root:
        for runner, build in CASES.items():
            if args.only not in (None, runner):
                continue
            for case in build(root):
                report(case, measure(case, args.rounds))
    print("load average: " + " ".join(f"{load:.2f}" for load in os.getloadavg()))


if __name__ == "__main__":
    main()
