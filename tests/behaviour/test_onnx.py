"""ONNX models: packaged from a file, bytes or a ModelProto, specs read from the graph or
checked against it, and run by onnxruntime in both modes with the same results as
onnxruntime called directly.

The graphs are built here with ``onnx.helper``. Without onnx and onnxruntime these tests skip,
saying so; with ``CI=true`` they fail instead.
"""

import os
import signal

import numpy as np
import psutil
import pytest
import torch

import ope
from ope import TensorSpec
from ope.runners import load_runner

import models

try:
    import onnx
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper
except ImportError as error:
    _reason = f"ONNX tests need onnx and onnxruntime (pip install 'ope[onnx]'): {error}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(_reason, pytrace=False)
    pytest.skip(_reason, allow_module_level=True)

OPSET = [helper.make_opsetid("", 17)]
RNG = np.random.default_rng(7)
WEIGHT = RNG.standard_normal((4, 3)).astype(np.float32)
BIAS = RNG.standard_normal(3).astype(np.float32)


def affine_model():
    """y = x @ WEIGHT + BIAS over a symbolic batch dim "batch"."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(BIAS, "b")])
    return helper.make_model(graph, opset_imports=OPSET)


def two_output_model():
    """From int64 ``ids`` [n] and float64 ``x`` [n, 2]: ``total`` (sum of x per row, an output
    of unknown shape), ``doubled`` (ids * 2) and ``positive`` (x > 0, bool)."""
    two = numpy_helper.from_array(np.array(2, np.int64), "two")
    zero = numpy_helper.from_array(np.array(0.0), "zero")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=0),
         helper.make_node("Mul", ["ids", "two"], ["doubled"]),
         helper.make_node("Greater", ["x", "zero"], ["positive"])],
        "two_outputs",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]),
         helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["n", 2])],
        [helper.make_tensor_value_info("total", TensorProto.DOUBLE, ["n"]),
         helper.make_tensor_value_info("doubled", TensorProto.INT64, ["n + 0"]),
         helper.make_tensor_value_info("positive", TensorProto.BOOL, ["n", None])],
        [two, zero, axes])
    return helper.make_model(graph, opset_imports=OPSET)


def matmul_model():
    """a @ b with every dim free: the spec lets mismatched inner dims through to onnxruntime."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, None]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, None])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [None, None])])
    return helper.make_model(graph, opset_imports=OPSET)


def string_model():
    """Lower-cases a batch of strings."""
    graph = helper.make_graph(
        [helper.make_node("StringNormalizer", ["text"], ["lower"], case_change_action="LOWER", locale="C")],
        "strings", [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("lower", TensorProto.STRING, ["n"])])
    return helper.make_model(graph, opset_imports=OPSET)


def direct(model, inputs):
    """What onnxruntime itself returns for ``inputs``, by output name."""
    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs)))


def affine_inputs(batch):
    return {"x": RNG.standard_normal((batch, 4)).astype(np.float32)}


@pytest.fixture(scope="module")
def affine(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    inputs = affine_inputs(2)
    return ope.package_onnx(root / "affine", affine_model(), name="affine", test_inputs=inputs,
                            test_outputs=direct(affine_model(), inputs))


def test_results_equal_onnxruntime_called_directly_at_any_batch(load_model, affine):
    model = load_model(affine.path)
    for batch in (1, 7, 300):  # none of them the test data's batch
        inputs = affine_inputs(batch)
        np.testing.assert_array_equal(model.infer(inputs)["y"], direct(affine_model(), inputs)["y"])


def test_specs_are_read_from_the_graph(tmp_path):
    affine = ope.package_onnx(tmp_path / "affine", affine_model(), name="affine")
    assert affine.inputs == (TensorSpec("x", "float32", ("batch", 4)),)
    assert affine.outputs == (TensorSpec("y", "float32", ("batch", 3)),)
    assert affine.requires == {"onnxruntime": ""}
    two = ope.package_onnx(tmp_path / "two", two_output_model(), name="two")
    assert two.inputs == (TensorSpec("ids", "int64", ("n",)), TensorSpec("x", "float64", ("n", 2)))
    # "n + 0" is no identifier and the last dim is unknown: both take any size.
    assert two.outputs == (TensorSpec("total", "float64", ("n",)),
                           TensorSpec("doubled", "int64", (None,)),
                           TensorSpec("positive", "bool", ("n", None)))


def test_every_output_comes_back_by_name(load_model, tmp_path):
    package = ope.package_onnx(tmp_path / "two", two_output_model(), name="two")
    model = load_model(package.path)
    inputs = {"ids": np.arange(5, dtype=np.int64), "x": RNG.standard_normal((5, 2))}
    got, want = model.infer(inputs), direct(two_output_model(), inputs)
    assert set(got) == {"total", "doubled", "positive"}
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
        assert got[name].dtype == want[name].dtype


@pytest.mark.parametrize("inputs, outputs, message", [
    ([TensorSpec("x", "float32", ("batch", 4))], [], r"missing y"),
    ([TensorSpec("x", "float32", ("batch", 4)), TensorSpec("z", "float32", ())], None,
     r"graph of the ModelProto given, whose inputs are x: not in the graph: z"),
    ([TensorSpec("x", "float64", ("batch", 4))], None, r"input 'x'.*float64, the graph float32"),
    ([TensorSpec("x", "float32", ("batch",))], None, r"input 'x'.*rank 1.*graph rank 2"),
    (None, [TensorSpec("y", "float32", ("batch", 5))], r"output 'y': dim 1 is 5 in the spec, 3"),
])
def test_specs_that_contradict_the_graph_are_refused(tmp_path, inputs, outputs, message):
    with pytest.raises(ope.SpecError, match=message):
        ope.package_onnx(tmp_path / "p", affine_model(), name="p", inputs=inputs, outputs=outputs)
    assert not os.listdir(tmp_path)  # nothing staged is left behind


def test_specs_that_agree_may_narrow_the_graph(tmp_path):
    narrowed = [TensorSpec("x", "float32", (2, 4))]
    package = ope.package_onnx(tmp_path / "p", affine_model(), name="p", inputs=narrowed,
                               outputs=[TensorSpec("y", "float32", (2, None))])
    assert package.inputs == tuple(narrowed)


def test_graph_names_that_are_not_identifiers_are_named(tmp_path):
    model = affine_model()
    model.graph.input[0].name = "input.1"
    model.graph.node[0].input[0] = "input.1"
    with pytest.raises(ope.SpecError, match=r"graph input 'input.1' is not a Python identifier"):
        ope.package_onnx(tmp_path / "p", model, name="p")


def test_element_types_without_an_ope_dtype_are_named(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    with pytest.raises(ope.SpecError, match=r"graph input 'x' has element type BFLOAT16, which "
                                            r"ope has no dtype for"):
        ope.package_onnx(tmp_path / "p", helper.make_model(graph, opset_imports=OPSET), name="p")


def test_a_rank_the_graph_leaves_open_needs_a_spec(load_model, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=OPSET)
    with pytest.raises(ope.SpecError, match=r"does not say the rank of input 'x'"):
        ope.package_onnx(tmp_path / "p", model, name="p")
    package = ope.package_onnx(tmp_path / "p", model, name="p",
                               inputs=[TensorSpec("x", "float32", ("n", 2))],
                               outputs=[TensorSpec("y", "float32", ("n", 2))])
    x = np.array([[-1, 2], [3, -4]], np.float32)
    np.testing.assert_array_equal(load_model(package.path).infer({"x": x})["y"], np.maximum(x, 0))


def test_bad_inputs_are_spec_errors(load_model, affine):
    model = load_model(affine.path)
    bad = [({"x": np.zeros((2, 4))}, "float64"), ({"x": np.zeros((2, 5), np.float32)}, "dim 1"),
           ({}, "missing"), ({"x": np.zeros(4, np.float32)}, "rank")]
    for inputs, message in bad:
        with pytest.raises(ope.SpecError, match=message):
            model.infer(inputs)
    assert model.infer(affine_inputs(3))["y"].shape == (3, 3)


def test_a_failure_inside_onnxruntime_is_a_model_error_and_the_model_stays_usable(load_model,
                                                                                 tmp_path):
    package = ope.package_onnx(tmp_path / "mm", matmul_model(), name="mm")
    model = load_model(package.path)
    with pytest.raises(ope.ModelError, match=r"model 'mm' raised .* while running"):
        model.infer({"a": np.ones((2, 3), np.float32), "b": np.ones((4, 2), np.float32)})
    result = model.infer({"a": np.ones((2, 3), np.float32), "b": np.ones((3, 5), np.float32)})
    np.testing.assert_array_equal(result["c"], np.full((2, 5), 3, np.float32))


def test_a_killed_worker_is_worker_crashed_and_the_next_call_is_served(affine):
    with ope.load(affine.path, out_of_process=True) as model:
        inputs = affine_inputs(4)
        model.infer(inputs)
        os.kill(model.stats()["pid"], signal.SIGKILL)
        with pytest.raises(ope.WorkerCrashed):
            model.infer(inputs)
        np.testing.assert_array_equal(model.infer(inputs)["y"], direct(affine_model(), inputs)["y"])


def test_strings_go_in_and_come_back_as_str_arrays(load_model, tmp_path):
    package = ope.package_onnx(tmp_path / "s", string_model(), name="s")
    assert package.inputs == (TensorSpec("text", "string", ("n",)),)
    result = load_model(package.path).infer({"text": np.array(["Hello", "ONNX", "x-Y"])})
    assert result["lower"].dtype.kind == "U"
    assert result["lower"].tolist() == ["hello", "onnx", "x-y"]


def test_a_path_bytes_and_a_model_proto_make_the_same_package(load_model, tmp_path):
    model_file = str(tmp_path / "affine.onnx")
    onnx.save(affine_model(), model_file)
    inputs = affine_inputs(5)
    want = direct(affine_model(), inputs)["y"]
    for source in (model_file, affine_model().SerializeToString(), affine_model()):
        package = ope.package_onnx(tmp_path / f"from-{type(source).__name__}", source, name="a",
                                   test_inputs=inputs, test_outputs={"y": want})
        np.testing.assert_array_equal(load_model(package.path).infer(inputs)["y"], want)


def test_weights_kept_beside_the_file_are_packaged(load_model, tmp_path):
    weight = RNG.standard_normal((32, 32)).astype(np.float32)  # big enough to stay external
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        [numpy_helper.from_array(weight, "w")])
    model_file = str(tmp_path / "src" / "big.onnx")
    os.makedirs(os.path.dirname(model_file))
    # Saving moves the weights out of the proto it is given: save a copy.
    onnx.save(helper.make_model(graph, opset_imports=OPSET), model_file,
              save_as_external_data=True, location="weights.bin")
    package = ope.package_onnx(tmp_path / "p", model_file, name="p")
    assert {"model.onnx", "model.onnx.data"} <= set(package.files)
    os.remove(os.path.join(os.path.dirname(model_file), "weights.bin"))  # the package has its own
    x = RNG.standard_normal((3, 32)).astype(np.float32)
    want = direct(helper.make_model(graph, opset_imports=OPSET), {"x": x})["y"]
    np.testing.assert_array_equal(load_model(package.path).infer({"x": x})["y"], want)


def test_files_that_are_not_onnx_are_package_errors_naming_the_path(tmp_path):
    checkpoint = str(tmp_path / "weights.pt")
    torch.save({"w": torch.zeros(2)}, checkpoint)
    with pytest.raises(ope.PackageError, match=rf"{checkpoint} looks like a torch.save "
                                               rf"checkpoint.*ope.package_onnx does not take"):
        ope.package_onnx(tmp_path / "a", checkpoint, name="a")
    scripted = str(tmp_path / "scripted.pt")
    torch.jit.save(torch.jit.script(torch.nn.ReLU()), scripted)
    with pytest.raises(ope.PackageError, match=r"scripted.pt looks like a TorchScript archive"
                                               r".*package it with ope.package_torchscript"):
        ope.package_onnx(tmp_path / "b", scripted, name="b")
    noise = str(tmp_path / "noise.onnx")
    with open(noise, "wb") as file:
        file.write(np.random.default_rng(1).bytes(4096))
    with pytest.raises(ope.PackageError, match=rf"^{noise}: not"):
        ope.package_onnx(tmp_path / "c", noise, name="c")
    with pytest.raises(ope.PackageError, match=r"the bytes given: not"):
        ope.package_onnx(tmp_path / "d", b"\x08\x07garbage", name="d")
    assert sorted(os.listdir(tmp_path)) == ["noise.onnx", "scripted.pt", "weights.pt"]


def test_threads_size_the_sessions_pool(affine, tmp_path):
    """threads=N gives the session N intra-op threads: N-1 pool threads in the worker beyond
    those its other libraries start for the same setting (a numpy package's worker)."""
    numpy_package = models.numpy_package(
        str(tmp_path), "def factory(data_dir):\n    return lambda x: {'y': x}\n", name="np",
        inputs=[TensorSpec("x", "float32", (None,))],
        outputs=[TensorSpec("y", "float32", (None,))])

    def worker_threads(path, threads):
        with ope.load(path, out_of_process=True, threads=threads) as model:
            stats = model.stats()
            return psutil.Process(stats["pid"]).num_threads(), stats["worker"]

    (onnx_1, described), (onnx_3, _) = worker_threads(affine.path, 1), worker_threads(affine.path, 3)
    numpy_1, numpy_3 = (worker_threads(numpy_package.path, n)[0] for n in (1, 3))
    assert described["intra_op_num_threads"] == 1
    assert (onnx_3 - onnx_1) - (numpy_3 - numpy_1) == 2


def test_stats_name_onnxruntime_and_its_version(load_model, affine):
    worker = load_model(affine.path).stats()["worker"]
    assert worker["runner"] == "onnx" and worker["framework"] == "onnxruntime"
    assert worker["framework_version"] == onnxruntime.__version__
    assert worker["providers"] == ["CPUExecutionProvider"]


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="this onnxruntime has the CUDA provider")
def test_a_cuda_device_without_the_cuda_provider_is_an_env_error(affine):
    """The runner a worker on a GPU builds (the worker numbers its one GPU cuda:0)."""
    with pytest.raises(ope.EnvError, match=r"device 'cuda:0'.*no CUDAExecutionProvider, only "
                                           r".*CPUExecutionProvider"):
        load_runner(affine, device="cuda:0")
