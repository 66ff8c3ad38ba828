"""The ``ope`` command: inspect a package, check it against its test data, run the demo.

Every command reports an OpeError as one line ``ope: error: ...`` and exit status 1, so
scripts can rely on the status and people can read the reason.
"""

import argparse
import sys

from ope.api import self_check
from ope.errors import OpeError
from ope.package import read_package
from ope.requirements import check_requirements

__all__ = ["main"]


def main(argv=None):
    """Entry point of the ``ope`` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.command(args)
    except OpeError as error:
        print(f"ope: error: {error}", file=sys.stderr)
        return 1


def _parser():
    parser = argparse.ArgumentParser(prog="ope", description="Out-of-process execution engine "
                                     "for deep-learning models.")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    inspect = commands.add_parser("inspect", help="show a package's specs, requires and files")
    inspect.add_argument("path", help="package folder")
    inspect.set_defaults(command=_inspect)
    check = commands.add_parser("check", help="verify a package and run its stored test data")
    check.add_argument("path", help="package folder")
    check.set_defaults(command=_check)
    demo = commands.add_parser("demo", help="package two models, self-check and run them")
    demo.set_defaults(command=_demo)
    return parser


def _inspect(args):
    package = read_package(args.path)
    print(f"package   {package.name}")
    print(f"path      {package.path}")
    print(f"runner    {package.runner}" + _runner_details(package))
    print("inputs")
    for spec in package.inputs:
        print(f"  {_format_spec(spec)}")
    print("outputs")
    for spec in package.outputs:
        print(f"  {_format_spec(spec)}")
    print("requires")
    for name, specifier in sorted(package.requires.items()):
        unmet = check_requirements({name: specifier})
        print(f"  {name}{specifier or ' (any version)'}"
              f"{'   [not satisfied here]' if unmet else ''}")
    if not package.requires:
        print("  (nothing beyond numpy)")
    print(f"test data {'yes' if package.has_test_data else 'no'}")
    print("files (sha256)")
    for relative, digest in sorted(package.files.items()):
        print(f"  {digest[:16]}  {relative}")
    return 0


def _runner_details(package):
    if package.runner == "python":
        return f" ({package.framework}, entrypoint {package.entrypoint})"
    return ""


def _format_spec(spec):
    dims = ", ".join("?" if dim is None else str(dim) for dim in spec.shape)
    return f"{spec.name:<16} {spec.dtype:<8} [{dims}]"


def _check(args):
    package = read_package(args.path)
    print(f"package {package.name!r}: manifest verified ({len(package.files)} files)")
    outputs = self_check(package.path)
    for name, array in outputs.items():
        print(f"  output {name!r}: {array.dtype} {list(array.shape)} matches the test data")
    print(f"package {package.name!r}: self-check passed")
    return 0


def _demo(args):
    from ope.demo import main as demo_main  # the demo imports torch: only pay for it here
    return demo_main()


if __name__ == "__main__":
    sys.exit(main())
