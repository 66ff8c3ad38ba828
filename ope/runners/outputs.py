"""What a model returned, bound to its output names: the one rule every runner follows.

A dict and a named tuple bind by name (a named tuple whose fields are not the outputs' names is
refused rather than read by position); a plain tuple or list binds in the order of the output
specs; anything else is the only output of a model with one. A list or tuple returned by a
model with one output is that output's value (e.g. a list of str), unless it holds exactly one
array or tensor.
"""

from ope.errors import SpecError

__all__ = ["bind_outputs"]


def bind_outputs(package, result):
    """``result`` as a dict keyed by output name; SpecError naming what came back when it
    cannot be bound. The values are checked afterwards by the spec (ope.spec)."""
    if isinstance(result, dict):  # the common case first: it is on every call's path
        return result
    names = package.output_names
    if isinstance(result, tuple) and hasattr(type(result), "_fields"):
        return _by_field(package, names, result)
    if isinstance(result, (tuple, list)) and _is_sequence_of_outputs(names, result):
        if len(result) != len(names):
            raise SpecError(f"model {package.name!r} returned a {type(result).__name__} of "
                            f"{len(result)}; expected {len(names)} outputs "
                            f"({', '.join(names)}), in that order")
        return dict(zip(names, result))
    if len(names) == 1:
        return {names[0]: result}
    raise SpecError(f"the model returned {type(result).__name__}; expected a dict of outputs "
                    f"({', '.join(names)}), or a tuple, list or named tuple of them")


def _by_field(package, names, result):
    fields = type(result)._fields
    if sorted(fields) != sorted(names):
        raise SpecError(f"model {package.name!r} returned named tuple "
                        f"{type(result).__name__}({', '.join(fields)}); its fields must be the "
                        f"outputs' names ({', '.join(names)})")
    return dict(zip(fields, result))


def _is_sequence_of_outputs(names, result):
    if len(names) > 1:
        return True
    return len(result) == 1 and hasattr(result[0], "shape")
