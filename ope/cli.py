"""The ``ope`` command: inspect a package, check it against its test data, run the demo,
manage worker environments (``ope env create|list|remove|gc|register``; ``--json`` for
scripts).

Every command reports an OpeError as one line ``ope: error: ...`` and exit status 1, so
scripts can rely on the status and people can read the reason.
"""

import argparse
import datetime
import json
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
    create = actions.add_parser("create", help="create a venv with ope and the requirements, "
                                "or the environment of a package's lock (--from)")
    create.add_argument("name", nargs="?", help="name of the environment (not with --from)")
    create.add_argument("--from", dest="package", metavar="PACKAGE_PATH",
                        help="build (or reuse) the environment of this package's lock")
    create.add_argument("--python", help="version (3.12) or interpreter path; default: this one")
    create.add_argument("--require", action="append", default=[], metavar="SPEC",
                        help="a PEP 508 requirement such as 'numpy<2' (repeatable)")
    create.add_argument("--json", action="store_true", help="print the record as JSON")
    create.set_defaults(command=_env_create)
    listing = actions.add_parser("list", help="environments: kind, Python, key package "
                                 "versions, size on disk, last use")
    listing.add_argument("--json", action="store_true", help="one JSON list for scripts")
    listing.set_defaults(command=_env_list)
    collect = actions.add_parser("gc", help="remove environments built from package locks "
                                 "that went unused or exceed a size budget")
    collect.add_argument("--unused-days", type=float, metavar="N",
                         help="remove those unused for more than N days")
    collect.add_argument("--max-gb", type=float, metavar="X",
                         help="then remove the least recently used until all take <= X GB")
    collect.add_argument("--json", action="store_true", help="print the names removed as JSON")
    collect.set_defaults(command=_env_gc)
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
    if args.package is not None:
        if args.name or args.python or args.require:
            raise OpeError("--from takes the name, Python and requirements from the "
                           "package's lock: pass none of NAME, --python, --require")
        env = envs.ensure_env(_package_lock(args.package),
                              progress=None if args.json else envs.progress_reporter())
    elif args.name is None:
        raise OpeError("ope env create needs a NAME, or --from PACKAGE_PATH")
    else:
        env = envs.create(args.name, python=args.python, requires=args.require,
                          log=(lambda line: None) if args.json else print)
    if args.json:
        print(json.dumps(_env_json(env), indent=1))
    else:
        done = "environment ready:" if args.package is not None else "created environment"
        print(f"{done} {env.name!r} ({env.kind}): Python {env.python_version}, "
              f"{_key_packages(env)}")
    return 0


def _package_lock(path):
    """The lock of the package at ``path``, once its manifest is verified."""
    package = read_package(path)
    lock_text = package.lock_text()
    if lock_text is None:
        raise OpeError(f"package {package.name!r} at {package.path} has no {envs.LOCK_FILE}: "
                       f"it was made without a lock; package it again with lock=True, or "
                       f"create a named environment (ope env create NAME --python X.Y "
                       f"--require ...)")
    return lock_text


def _env_json(env):
    return {"name": env.name, "kind": env.kind, "python": env.python,
            "python_version": env.python_version, "packages": env.packages,
            "requires": env.requires, "created": env.created, "ope_version": env.ope_version,
            "stale": env.stale, "size_bytes": envs.size_on_disk(env),
            "last_used": _iso(envs.last_used(env)),
            "used_by": sorted(set(envs.used_by(env.name).values()))}


def _iso(timestamp):
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).isoformat(
        timespec="seconds")


def _env_register(args):
    env = envs.register(args.name, args.path)
    print(f"registered environment {env.name!r}: Python {env.python_version} at {env.python}, "
          f"{_key_packages(env)}")
    return 0


def _env_list(args):
    listing = [_env_json(env) for env in envs.list_envs()]
    if args.json:
        print(json.dumps(listing, indent=1))
        return 0
    print(f"environments in {envs.ope_home()}/envs")
    for env, facts in zip(envs.list_envs(), listing):
        stale = "   [built from other ope source]" if env.stale else ""
        print(f"  {env.name:<21} {env.kind:<10} Python {env.python_version:<8} "
              f"{facts['size_bytes'] / 1e6:7.1f} MB  used {facts['last_used'][:16]}  "
              f"{_key_packages(env)}{stale}")
        if facts["used_by"]:
            print(f"  {'':<21} used by {', '.join(facts['used_by'])}")
    return 0


def _env_gc(args):
    if args.unused_days is None and args.max_gb is None:
        raise OpeError("ope env gc needs --unused-days N and/or --max-gb X")
    max_bytes = None if args.max_gb is None else args.max_gb * 1e9
    removed = envs.gc(unused_days=args.unused_days, max_bytes=max_bytes)
    if args.json:
        print(json.dumps(removed))
    else:
        print(f"removed {len(removed)} environment(s){': ' if removed else ''}"
              f"{', '.join(removed)}")
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
