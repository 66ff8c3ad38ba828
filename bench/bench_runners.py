"""What ope adds to a model's call, per runner: the model called directly in its framework,
through ``ope.load(out_of_process=False)`` and out of process, side by side.

    PYTHONPATH=. python bench/bench_runners.py [--pairs 6] [--aot] [--only torch_export_case,...]

Each case is one runner with one model: "16 B" (a float32 (1, 4) input, the call is all
overhead) and "1 ms" (an MLP whose direct call takes about a millisecond here). The three
columns alternate in chunks, forwards then backwards (ABBA), each chunk opening with untimed
calls; printed are the medians of chunk medians, and ope's overhead per call over the direct
call in µs and as a ratio. Torch runs one intra-op thread in every column (the workers get
``threads=1``), so the columns differ only by what ope does.

A case is a function in CASES: ``case(root, size) -> Case`` packages its model under ``root``
and returns how to call it directly and where its package is. Another framework adds one
function per runner to that list. Each chunk starts after a 50 ms pause, so that the previous
column's threads go idle (onnxruntime's pool spins after each run: on a 2-vCPU machine a
spinning pool in the host takes a core from the worker).
"""

import argparse
import collections
import importlib
import os
import statistics
import sys
import tempfile
import textwrap
import time
import warnings

import numpy as np

import ope

SIZES = ("16 B", "1 ms")
CHUNK_S = 0.2

# direct(): the call without ope, from numpy inputs to numpy outputs; package: its path.
Case = collections.namedtuple("Case", "name direct package inputs")

# The torch models, in a module of their own so that torch.package can intern its source.
_TORCH_MODELS = '''
import torch


class AddOne(torch.nn.Module):
    def forward(self, x):
        return x + 1


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.Sequential(*[
            torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU()) for _ in range(4)])

    def forward(self, x):
        return self.layers(x)
'''

_SHAPES = {"16 B": (1, 4), "1 ms": (192, 256)}


def _torch_models(root):
    """The module holding the torch models, written under ``root`` and imported."""
    import torch
    source_dir = os.path.join(root, "models_src")
    os.makedirs(source_dir, exist_ok=True)
    with open(os.path.join(source_dir, "bench_torch_models.py"), "w") as file:
        file.write(textwrap.dedent(_TORCH_MODELS))
    sys.path.insert(0, source_dir)
    torch.set_num_threads(1)
    return importlib.import_module("bench_torch_models")


def _torch_case(root, size, runner, package):
    """A Case for a torch model of ``size``: ``package(path, module, specs)`` packages it and
    returns what the runner calls (the scripted module, the exported program's module, ...),
    which the direct column calls too: the columns differ by ope alone."""
    import torch
    models = _torch_models(root)
    module = (models.AddOne() if size == "16 B" else models.Mlp()).eval()
    shape = _SHAPES[size]
    spec = ([ope.TensorSpec("x", "float32", shape)], [ope.TensorSpec("y", "float32", shape)])
    path = os.path.join(root, f"{runner}-{size}".replace(" ", "-"))
    model = package(path, module, spec)
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)

    def direct():
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()
    return Case(f"{runner} {size}", direct, path, {"x": x})


def torchscript_case(root, size):
    def package(path, module, spec):
        import torch
        scripted = torch.jit.script(module)
        ope.package_torchscript(path, scripted, name="bench", inputs=spec[0], outputs=spec[1])
        return scripted
    with warnings.catch_warnings():  # torch deprecates TorchScript; this times it on purpose
        warnings.simplefilter("ignore", DeprecationWarning)
        return _torch_case(root, size, "torchscript", package)


def _export_packager(aot):
    def package(path, module, spec):
        import torch
        program = torch.export.export(module, (torch.zeros(spec[0][0].shape),))
        ope.package_torch_export(path, program, name="bench", inputs=spec[0],
                                 outputs=spec[1], aot=aot)
        return (torch._inductor.aoti_load_package(os.path.join(path, "model.pt2")) if aot
                else program.module())
    return package


def torch_export_case(root, size):
    return _torch_case(root, size, "torch_export", _export_packager(aot=False))


def torch_export_aot_case(root, size):
    return _torch_case(root, size, "torch_export aot", _export_packager(aot=True))


def torch_package_case(root, size):
    def package(path, module, spec):
        import torch
        archive = path + ".package"
        with torch.package.PackageExporter(archive) as exporter, warnings.catch_warnings():
            # torch.package pickles storages through an API torch itself deprecates
            warnings.filterwarnings("ignore", "TypedStorage is deprecated", UserWarning)
            exporter.intern("bench_torch_models")
            exporter.extern(["torch", "torch.**"])
            exporter.save_pickle("bench", "model.pkl", module)
        ope.package_torch_package(path, archive, "bench", "model.pkl", name="bench",
                                  inputs=spec[0], outputs=spec[1])
        return module
    return _torch_case(root, size, "torch_package", package)


def onnx_case(root, size):
    """onnxruntime: add-one on (1, 4) floats, or x[32, 2048] @ w[2048, 2048] (about 1 ms)."""
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper
    if size == "16 B":
        x, node, weights = np.zeros((1, 4), np.float32), ("Add", "one"), {"one": np.ones(1, np.float32)}
    else:
        x, node = np.ones((32, 2048), np.float32), ("MatMul", "w")
        weights = {"w": np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)}
    graph = helper.make_graph(
        [helper.make_node(node[0], ["x", node[1]], ["y"])], "bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(array, name) for name, array in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = os.path.join(root, f"onnx-{size}".replace(" ", "-"))
    ope.package_onnx(path, model, name="bench",
                     outputs=[ope.TensorSpec("y", "float32", (x.shape[0], None))])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    session = onnxruntime.InferenceSession(model.SerializeToString(), options,
                                           providers=["CPUExecutionProvider"])
    return Case(f"onnx {size}", lambda: session.run(["y"], {"x": x})[0], path, {"x": x})


CASES = [torchscript_case, torch_export_case, torch_package_case, onnx_case]
SLOW_CASES = [torch_export_aot_case]  # AOTInductor compiles for about a minute per model


def _chunk_median_us(call, calls):
    time.sleep(0.05)  # the previous column's threads go idle (module docstring)
    call()  # untimed: wakes a worker that idled through the other columns' chunks
    times = []
    for _ in range(calls):
        start = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times) / 1e3


def measure(case, pairs):
    """{column: median of chunk medians in µs}, the columns alternating ABBA."""
    with ope.load(case.package, out_of_process=False) as in_process, \
            ope.load(case.package, out_of_process=True, threads=1) as out_of_process:
        columns = {"direct": case.direct,
                   "in process": lambda: in_process.infer(case.inputs),
                   "out of process": lambda: out_of_process.infer(case.inputs)}
        for name, call in columns.items():  # the outputs agree before anything is timed
            np.testing.assert_array_equal(
                call() if name == "direct" else call()["y"], case.direct())
        start = time.perf_counter()
        case.direct()
        calls = max(20, int(CHUNK_S / max(time.perf_counter() - start, 1e-6)))
        chunks = {name: [] for name in columns}
        order = list(columns)
        for pair in range(pairs):
            for name in (order if pair % 2 == 0 else order[::-1]):
                chunks[name].append(_chunk_median_us(columns[name], calls))
    return {name: statistics.median(values) for name, values in chunks.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6, help="ABBA rounds per case")
    parser.add_argument("--aot", action="store_true", help="also the AOTInductor cases (slow)")
    parser.add_argument("--only", help="comma-separated case functions, e.g. torch_export_case")
    args = parser.parse_args()
    cases = CASES + (SLOW_CASES if args.aot else [])
    if args.only:
        cases = [case for case in cases if case.__name__ in args.only.split(",")]
    print(f"load average {os.getloadavg()[0]:.2f}; medians of {args.pairs * 2} chunks per column")
    print(f"{'case':<24} {'direct µs':>10} {'in process µs':>14} {'+µs':>7} {'x':>6} "
          f"{'out of process µs':>18} {'+µs':>7} {'x':>6}")
    with tempfile.TemporaryDirectory(prefix="ope-bench-runners-") as root:
        for make_case in cases:
            for size in SIZES:
                case = make_case(os.path.join(root, make_case.__name__), size)
                medians = measure(case, args.pairs)
                direct = medians["direct"]
                row = f"{case.name:<24} {direct:10.1f}"
                for column, width in (("in process", 14), ("out of process", 18)):
                    value = medians[column]
                    row += f" {value:{width}.1f} {value - direct:7.1f} {value / direct:6.2f}"
                print(row, flush=True)


if __name__ == "__main__":
    main()
