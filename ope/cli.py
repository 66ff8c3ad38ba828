"""The ``ope`` command: inspect a package, check it against its test data, run the demo,
manage worker environments (``ope env create|list|remove|register``).

Every command reports an OpeError as one line ``ope: error: ...`` and exit status 1, so
scripts can rely on the status and people can read the reason.
"""

import argparse
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ope import envs
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
    _add_env_commands(commands)
    return parser


def _add_env_commands(commands):
    env = commands.add_parser("env", help="manage worker environments (under $OPE_HOME/envs)")
    actions = env.add_subparsers(required=True, metavar="ACTION")
    create = actions.add_parser("create", help="create a venv with ope and the requirements")
    create.add_argument("name")
    create.add_argument("--python", help="version (3.12) or interpreter path; default: this one")
    create.add_argument("--require", action="append", default=[], metavar="SPEC",
                        help="a PEP 508 requirement such as 'numpy<2' (repeatable)")
    create.set_defaults(command=_env_create)
    listing = actions.add_parser("list", help="environments, Python and key package versions")
    listing.set_defaults(command=_env_list)
    remove = actions.add_parser("remove", help="delete an environment")
    remove.add_argument("name")
    remove.set_defaults(command=_env_remove)
    register = actions.add_parser("register", help="record an existing interpreter or venv")
    register.add_argument("name")
    register.add_argument("path", help="interpreter or venv folder (with ope installed)")
    register.set_defaults(command=_env_register)


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


def _env_create(args):
    env = envs.create(args.name, python=args.python, requires=args.require)
    print(f"created environment {env.name!r}: Python {env.python_version}, "
          f"{_key_packages(env)}")
    return 0


def _env_register(args):
    env = envs.register(args.name, args.path)
    print(f"registered environment {env.name!r}: Python {env.python_version} at {env.python}, "
          f"{_key_packages(env)}")
    return 0


def _env_list(args):
    print(f"environments in {envs.ope_home()}/envs")
    for env in envs.list_envs():
        stale = "   [built from other ope source]" if env.stale else ""
        print(f"  {env.name:<16} {env.kind:<10} Python {env.python_version:<8} "
              f"{_key_packages(env)}{stale}")
    return 0


# Shown by `ope env list` besides what the environment was asked for.
_KEY_PACKAGES = ("ope", "numpy", "torch", "tensorflow", "jax")


def _key_packages(env):
    asked = [Requirement(text).name for text in env.requires]
    names = dict.fromkeys(canonicalize_name(name) for name in (*_KEY_PACKAGES, *asked))
    return ", ".join(f"{name} {env.packages[name]}" for name in names if name in env.packages)


def _env_remove(args):
    envs.remove(args.name)
    print(f"removed environment {args.name!r}")
    return 0


def _demo(args):
    from ope.demo import main as demo_main  # the demo imports torch: only pay for it here
    return demo_main()


if __name__ == "__main__":
    sys.exit(main())
