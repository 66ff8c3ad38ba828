"""Every spec rule, through model.infer: dtypes, fixed / None / symbol dims, symbols shared
across inputs and outputs, unknown and missing names, strings, torch tensors. After every
refused call a good call must still work."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ope
import ope_native
from ope import SpecError, TensorSpec
from ope.spec import DTYPES

import models
from conftest import MODES

NUMERIC_DTYPES = [d for d in DTYPES if d != "string"]


def assert_still_works(model, inputs):
    outputs = model.infer(inputs)
    assert set(outputs) == {spec.name for spec in model.outputs}


# --- TensorSpec itself ------------------------------------------------------------------------

def test_spec_round_trips_through_dict():
    spec = TensorSpec("x", "float32", ["batch", 4, None])
    assert spec.shape == ("batch", 4, None)
    assert TensorSpec.from_dict(spec.to_dict()) == spec
    assert hash(TensorSpec.from_dict(spec.to_dict())) == hash(spec)
    assert spec.numpy_dtype == np.float32


def test_string_spec_uses_unicode_arrays():
    assert TensorSpec("s", "string", ()).numpy_dtype.kind == "U"


@pytest.mark.parametrize("name, dtype, shape, message", [
    ("x", "float", (1,), "unknown dtype 'float'"),
    ("x", "float32", (-1,), "dim 0 must be"),
    ("x", "float32", (1.5,), "dim 0 must be"),
    ("x", "float32", (True,), "dim 0 must be"),
    ("x", "float32", ("not a symbol",), "symbol of dim 0"),
    ("x", "float32", "batch", "shape must be a sequence"),
    ("2x", "float32", (), "tensor name must be a Python identifier"),
    ("", "float32", (), "tensor name"),
])
def test_bad_spec_is_refused(name, dtype, shape, message):
    with pytest.raises(SpecError, match=message):
        TensorSpec(name, dtype, shape)


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(SpecError, match="exactly the keys"):
        TensorSpec.from_dict({"name": "x", "dtype": "int8", "shape": [], "extra": 1})


# --- dtypes --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def all_dtypes_model_path(tmp_path_factory):
    inputs = [TensorSpec(f"t_{dtype}", dtype, (2,)) for dtype in DTYPES]
    return models.echo_package(str(tmp_path_factory.mktemp("dtypes")), inputs).path


def good_all_dtypes_inputs():
    inputs = {f"t_{dtype}": np.zeros(2, dtype) for dtype in NUMERIC_DTYPES}
    inputs["t_string"] = np.array(["a", "bc"])
    return inputs


def test_every_dtype_passes_through_unchanged(load_model, all_dtypes_model_path):
    model = load_model(all_dtypes_model_path)
    inputs = good_all_dtypes_inputs()
    outputs = model.infer(inputs)
    for name, array in inputs.items():
        assert outputs["echo_" + name].dtype.kind == array.dtype.kind
        np.testing.assert_array_equal(outputs["echo_" + name], array)


@pytest.mark.parametrize("spec_dtype", DTYPES)
@pytest.mark.parametrize("given_dtype", NUMERIC_DTYPES)
def test_dtype_must_match_exactly(load_model, all_dtypes_model_path, spec_dtype, given_dtype):
    if spec_dtype == given_dtype:
        return
    model = load_model(all_dtypes_model_path)
    inputs = good_all_dtypes_inputs()
    inputs[f"t_{spec_dtype}"] = np.zeros(2, given_dtype)
    with pytest.raises(SpecError, match=f"input 't_{spec_dtype}': expected dtype {spec_dtype}"):
        model.infer(inputs)
    assert_still_works(model, good_all_dtypes_inputs())


def test_non_native_byte_order_is_not_cast(load_model, all_dtypes_model_path):
    model = load_model(all_dtypes_model_path)
    inputs = good_all_dtypes_inputs()
    inputs["t_float32"] = np.zeros(2, ">f4")
    with pytest.raises(SpecError, match="float32 in non-native byte order"):
        model.infer(inputs)
    assert_still_works(model, good_all_dtypes_inputs())


# --- names ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair_path(tmp_path_factory):
    inputs = [TensorSpec("x", "float32", ("batch", 4)), TensorSpec("y", "float32", ("batch", 4))]
    return models.echo_package(str(tmp_path_factory.mktemp("pair")), inputs).path


def pair(batch=2, x_shape=None, y_shape=None):
    return {"x": np.ones(x_shape or (batch, 4), np.float32),
            "y": np.ones(y_shape or (batch, 4), np.float32)}


def test_missing_input_is_named(load_model, pair_path):
    model = load_model(pair_path)
    with pytest.raises(SpecError, match="missing input 'y'"):
        model.infer({"x": pair()["x"]})
    assert_still_works(model, pair())


def test_unknown_input_is_named(load_model, pair_path):
    model = load_model(pair_path)
    with pytest.raises(SpecError, match="unknown input 'z'"):
        model.infer({**pair(), "z": pair()["x"]})
    with pytest.raises(SpecError, match="missing input 'y'; unknown input 'z'"):
        model.infer({"x": pair()["x"], "z": pair()["x"]})
    assert_still_works(model, pair())


def test_inputs_must_be_a_mapping(load_model, pair_path):
    model = load_model(pair_path)
    with pytest.raises(SpecError, match="must be a mapping"):
        model.infer([pair()["x"], pair()["y"]])
    assert_still_works(model, pair())


@pytest.mark.parametrize("value", [[[1.0] * 4] * 2, 3.0, "text", None])
def test_non_array_values_are_refused(load_model, pair_path, value):
    model = load_model(pair_path)
    with pytest.raises(SpecError, match="input 'x': expected a numpy array or CPU torch tensor"):
        model.infer({**pair(), "x": value})
    assert_still_works(model, pair())


# --- dims ----------------------------------------------------------------------------------

def test_rank_mismatch_names_tensor_and_ranks(load_model, pair_path):
    model = load_model(pair_path)
    with pytest.raises(SpecError, match=r"input 'x': expected rank 2 .* got rank 3"):
        model.infer(pair(x_shape=(2, 4, 1)))
    assert_still_works(model, pair())


def test_fixed_dim_mismatch_names_dim(load_model, pair_path):
    model = load_model(pair_path)
    with pytest.raises(SpecError, match="input 'y': dim 1 expected size 4, got 5"):
        model.infer(pair(y_shape=(2, 5)))
    assert_still_works(model, pair())


def test_symbol_must_agree_across_inputs(load_model, pair_path):
    model = load_model(pair_path)
    with pytest.raises(SpecError, match="input 'y': dim 0 is symbol 'batch' = 3, but 'batch' "
                                        "= 2 from input 'x' dim 0"):
        model.infer(pair(x_shape=(2, 4), y_shape=(3, 4)))
    assert_still_works(model, pair())


def test_symbol_may_differ_between_calls(load_model, pair_path):
    model = load_model(pair_path)
    for batch in (1, 5, 0):
        assert model.infer(pair(batch))["echo_x"].shape == (batch, 4)


def test_symbol_repeated_within_one_tensor(tmp_path, load_model):
    model = load_model(models.echo_package(
        str(tmp_path), [TensorSpec("square", "float64", ("n", "n", None))]).path)
    assert model.infer({"square": np.zeros((3, 3, 7))})["echo_square"].shape == (3, 3, 7)
    with pytest.raises(SpecError, match="dim 1 is symbol 'n' = 4, but 'n' = 3 from input "
                                        "'square' dim 0"):
        model.infer({"square": np.zeros((3, 4, 7))})
    assert_still_works(model, {"square": np.zeros((2, 2, 0))})


SHAPE = st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple)


@pytest.fixture(scope="module")
def mixed_dims_path(tmp_path_factory):
    inputs = [TensorSpec("a", "float32", ("n", 3, None)), TensorSpec("b", "int64", ("n",))]
    return models.echo_package(str(tmp_path_factory.mktemp("mixed")), inputs).path


@pytest.fixture(scope="module", params=MODES)
def mixed_dims_model(request, mixed_dims_path):
    """One model serves every generated example: also a test of reuse after errors."""
    with ope.load(mixed_dims_path, out_of_process=request.param == "out_of_process") as model:
        yield model


@settings(max_examples=150, deadline=None)
@given(a_shape=SHAPE, b_shape=SHAPE)
def test_generated_shapes_are_accepted_exactly_when_they_fit(mixed_dims_model, a_shape, b_shape):
    model = mixed_dims_model
    fits = (len(a_shape) == 3 and a_shape[1] == 3 and len(b_shape) == 1
            and b_shape[0] == a_shape[0])
    inputs = {"a": np.zeros(a_shape, np.float32), "b": np.zeros(b_shape, np.int64)}
    if fits:
        outputs = model.infer(inputs)
        assert outputs["echo_a"].shape == a_shape and outputs["echo_b"].shape == b_shape
    else:
        with pytest.raises(SpecError):
            model.infer(inputs)
        assert_still_works(model, {"a": np.zeros((2, 3, 1), np.float32),
                                   "b": np.zeros(2, np.int64)})


@settings(max_examples=60, deadline=None)
@given(spec_shape=st.lists(st.one_of(st.integers(0, 4), st.none(), st.sampled_from("pq")),
                           max_size=4),
       shape=SHAPE)
def test_generated_spec_and_shape_follow_the_dim_rules(spec_shape, shape):
    spec = TensorSpec("t", "int8", spec_shape)
    sizes = {}
    fits = len(shape) == len(spec_shape) and all(
        want is None or (want == got if isinstance(want, int) else sizes.setdefault(want, got) == got)
        for want, got in zip(spec_shape, shape))
    if fits:
        ope.spec.check_shape(spec, shape)
    else:
        with pytest.raises(SpecError, match="input 't'"):
            ope.spec.check_shape(spec, shape)


# --- outputs -------------------------------------------------------------------------------

def probe_inputs(behaviour="ok", n=3):
    return {"x": np.ones((n, 2), np.float32), "behaviour": behaviour}


@pytest.mark.parametrize("behaviour, message", [
    ("wrong_dtype", "output 'y': expected dtype float32, got float64"),
    ("wrong_rank", "output 'y': expected rank 2"),
    ("wrong_fixed_dim", "output 'y': dim 1 expected size 2, got 3"),
    ("wrong_symbol", "output 'y': dim 0 is symbol 'n' = 4, but 'n' = 3 from the inputs"),
    ("missing_output", "missing output 'label'"),
    ("extra_output", "unknown output 'z'"),
    ("not_a_dict", "the model returned int; expected a dict of outputs"),
])
def test_bad_outputs_are_refused(load_model, probe, behaviour, message):
    model = load_model(probe.path)
    with pytest.raises(SpecError, match=message):
        model.infer(probe_inputs(behaviour))
    assert_still_works(model, probe_inputs())


def test_string_outputs_come_back_as_str_arrays(load_model, probe):
    model = load_model(probe.path)
    for behaviour in ("ok", "list_output"):
        label = model.infer(probe_inputs(behaviour))["label"]
        assert label.dtype.kind == "U" and label.tolist() == ["ok"] * 3


# --- strings and torch tensors -------------------------------------------------------------

@pytest.fixture(scope="module")
def strings_path(tmp_path_factory):
    inputs = [TensorSpec("words", "string", ("rows", None)), TensorSpec("tag", "string", ())]
    return models.echo_package(str(tmp_path_factory.mktemp("strings")), inputs).path


@pytest.mark.parametrize("words", [
    [["a", "bb"], ["ccc", ""]],
    (("a", "bb"), ("ccc", "")),
    np.array([["a", "bb"], ["ccc", ""]]),
    np.array([["a", "bb"], ["ccc", ""]], dtype=object),
])
def test_strings_accepted_as_lists_and_arrays(load_model, strings_path, words):
    model = load_model(strings_path)
    outputs = model.infer({"words": words, "tag": "hello"})
    assert outputs["echo_words"].dtype.kind == "U"
    assert outputs["echo_words"].tolist() == [["a", "bb"], ["ccc", ""]]
    assert outputs["echo_tag"].shape == () and str(outputs["echo_tag"]) == "hello"


def test_large_and_non_native_string_tensors_round_trip(load_model, strings_path):
    """Strings lie in the arena like numbers (ope/bridge/protocol.py): megabytes of them pass, and
    big-endian UCS-4 arrives as the same text."""
    model = load_model(strings_path)
    words = np.array([[f"word {i:07d} ünïcode", "x"] for i in range(40_000)])
    assert words.nbytes > 4 << 20
    outputs = model.infer({"words": words.astype(words.dtype.newbyteorder(">")), "tag": "t"})
    np.testing.assert_array_equal(outputs["echo_words"], words)


@pytest.mark.parametrize("words, message", [
    ([["a", 1]], "expected str elements for a string tensor, got int"),
    ([["a", "b"], ["c"]], "expected str elements"),
    (np.zeros((1, 2)), "expected dtype string"),
    (np.array([[b"a"]]), "expected dtype string"),
    (5, "expected dtype string"),
    ([["a", "b"]] * 2 + [[]], "expected str elements"),
])
def test_bad_strings_are_refused(load_model, strings_path, words, message):
    model = load_model(strings_path)
    with pytest.raises(SpecError, match=f"input 'words': {message}"):
        model.infer({"words": words, "tag": "t"})
    assert_still_works(model, {"words": [["ok"]], "tag": "t"})


def test_string_rank_is_checked(load_model, strings_path):
    model = load_model(strings_path)
    with pytest.raises(SpecError, match="input 'words': expected rank 2"):
        model.infer({"words": ["a", "b"], "tag": "t"})
    assert_still_works(model, {"words": [["ok"]], "tag": "t"})


def test_cpu_torch_tensors_are_accepted(load_model, pair_path):
    model = load_model(pair_path)
    x = torch.arange(8, dtype=torch.float32).reshape(2, 4)
    y = torch.ones(2, 4, requires_grad=True)
    outputs = model.infer({"x": x, "y": y})
    np.testing.assert_array_equal(outputs["echo_x"], x.numpy())
    assert isinstance(outputs["echo_y"], np.ndarray)


def test_torch_tensor_view_is_not_copied():
    spec = (TensorSpec("x", "float32", (4,)),)
    tensor = torch.zeros(4)
    arrays, _ = ope.spec.validate_inputs(spec, {"x": tensor})
    tensor[0] = 7
    assert arrays["x"][0] == 7


def test_numpy_arrays_are_not_copied():
    spec = (TensorSpec("x", "float32", (None,)),)
    array = np.zeros(3, np.float32)
    arrays, bindings = ope.spec.validate_inputs(spec, {"x": array})
    assert arrays["x"] is array and bindings == {}


@pytest.mark.parametrize("tensor, message", [
    (torch.zeros(2, 4, dtype=torch.float64), "expected dtype float32, got float64"),
    (torch.zeros(2, 4, dtype=torch.bfloat16), "torch tensor of torch.bfloat16 has no numpy view"),
    (torch.zeros(2, 4, device="meta"), "expected a CPU tensor"),
])
def test_bad_torch_tensors_are_refused(load_model, pair_path, tensor, message):
    model = load_model(pair_path)
    with pytest.raises(SpecError, match=f"input 'x': {message}"):
        model.infer({**pair(), "x": tensor})
    assert_still_works(model, pair())


def test_duplicate_names_are_refused():
    with pytest.raises(SpecError, match="duplicate input name 'x'"):
        ope.spec.validate_inputs([TensorSpec("x", "int8", ()), TensorSpec("x", "int8", ())], {})


# --- the success path in C agrees with the rules ---------------------------------------------

DIMS = st.lists(st.one_of(st.integers(0, 3), st.none(), st.sampled_from("pq")), max_size=3)


@settings(max_examples=300, deadline=None)
@given(spec_shapes=st.lists(DIMS, min_size=1, max_size=3),
       shapes=st.lists(st.lists(st.integers(0, 3), max_size=3).map(tuple), min_size=1, max_size=3),
       dtypes=st.lists(st.sampled_from(["int8", "float32"]), min_size=3, max_size=3),
       bound=st.dictionaries(st.sampled_from("pq"), st.integers(0, 3)))
def test_the_native_success_path_accepts_exactly_what_the_python_loop_accepts(
        spec_shapes, shapes, dtypes, bound):
    """ope_native.check_plain takes plain arrays in one C call and leaves everything else to
    the Python loop: whatever it accepts, the loop accepts with the same symbol sizes, and
    whatever the loop accepts from plain arrays, it accepts too."""
    specs = tuple(TensorSpec(f"t{i}", "int8", dims) for i, dims in enumerate(spec_shapes))
    values = {f"t{i}": np.zeros(shape, dtypes[i]) for i, shape in enumerate(shapes)}
    plan = ope.spec._Plan(specs, "output")
    native_sizes, python_sizes = dict(bound), dict(bound)
    native = ope_native.check_plain(plan.native_rows, values, native_sizes)
    try:
        expected = ope.spec._check_each(plan, values, python_sizes, bound)
    except SpecError:
        assert native is None
        return
    assert native is not None and native.keys() == expected.keys()
    assert all(native[name] is expected[name] for name in expected)
    assert native_sizes == python_sizes


def test_a_fixed_dim_no_array_can_have_is_a_spec_error_not_an_overflow():
    specs = (TensorSpec("x", "float32", (2 ** 63,)),)
    with pytest.raises(SpecError, match="dim 0 expected size 9223372036854775808, got 3"):
        ope.spec.validate_inputs(specs, {"x": np.zeros(3, np.float32)})
