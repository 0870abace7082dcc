"""One exit-status convention for every entry point, and the small helpers that keep it.

    0    done (also: nothing to do, e.g. `resume=auto` on a finished run)
    1    a crash: a bug or an environment failure, reported with its traceback
    2    bad input or configuration: one line `error: ...` naming the file, row or key
    130  interrupted (Ctrl-C)
    143  terminated (SIGTERM, e.g. a cluster preempting the job)
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import NoReturn

from hpa_lightning.errors import UsageError
from hpa_lightning.machine import register_resolvers

register_resolvers()  # before Hydra composes a config that uses them

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143
# Set by `resume` and `rerun_failed` for the job they relaunch: the overrides file its configuration was read from,
# so that the job checks every `_target_` against the allowlist (hpa_lightning.targets) before building anything.
ENV_SAVED_OVERRIDES = "HPA_SAVED_OVERRIDES"


def fail(message: object, status: int = EXIT_BAD_INPUT) -> NoReturn:
    """One `error: ...` line on stderr and exit `status` (2: bad input; 1: the job itself could not be done)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def command_doc(module: str) -> str:
    """The docstring of the command module `module`, read from its source (importing it could take seconds)."""
    import ast
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:  # a package: its __main__ is the command
        spec = importlib.util.find_spec(f"{module}.__main__")
    if spec is None or not spec.origin:
        return ""
    with open(spec.origin, encoding="utf-8") as handle:
        return ast.get_docstring(ast.parse(handle.read())) or ""


def print_help(prog: str, defaults: dict[str, object], usage: str = "") -> NoReturn:
    """`--help` of a key=value command: its module's docstring and every key with its default; exit 0."""
    keys = "\n".join(f"  {key}={'' if value is None else value}" for key, value in defaults.items())
    print(f"{command_doc(prog)}\n\n{usage + chr(10) if usage else ''}"
          f"arguments (key=value; defaults shown, empty: required or none):\n{keys}")
    sys.exit(0)


def _is_override(arg: str) -> bool:
    """A Hydra override: `key=value`, `+key=value`, `++key=value` or `~key`."""
    return "=" in arg or arg.startswith("~")


def parse_key_values(argv: list[str], defaults: dict[str, object], prog: str, *, positional: str = "",
                     many: bool = False, overrides: bool = False) -> dict[str, object]:
    """The one parser of the commands that do not compose conf/: `key=value` arguments typed like their defaults.

    `positional` names the folder(s) given before or among them (a string, or with `many` a list of one or more);
    with `overrides`, a `key=value` whose key is not the command's own is a Hydra override for the job the command
    launches, collected in order under "overrides". `UsageError` on unknown keys, bad values or a missing
    positional; `-h` / `--help` prints the command's help and exits 0.
    """
    usage = f"usage: {prog} " + (f"{positional.upper()}{' [...]' if many else ''} " if positional else "") + \
        "[key=value ...]" + (" [overrides ...]" if overrides else "")
    if any(arg in ("-h", "--help") for arg in argv):
        print_help(prog, defaults, usage)
    values, given, passed = dict(defaults), [], []
    for arg in argv:
        key, sep, raw = arg.partition("=")
        if arg.startswith("-") and not sep:
            flag = arg.lstrip("-").replace("-", "_")
            hint = f"; write {flag}={'true' if isinstance(defaults.get(flag), bool) else '...'}" if flag in defaults \
                else ""
            raise UsageError(f"{prog}: unknown option {arg!r}{hint} (arguments are key=value)")
        if sep and key in defaults:
            kind = type(defaults[key]) if defaults[key] is not None else str
            try:
                values[key] = kind(raw) if kind is not bool else raw.lower() in ("1", "true", "yes")
            except ValueError:
                raise UsageError(f"{prog}: {key}={raw!r} is not a valid {kind.__name__}") from None
        elif overrides and _is_override(arg):
            passed.append(arg)
        elif positional and not sep and (many or not given):
            given.append(arg)
        else:
            raise UsageError(f"{prog}: unknown argument {arg!r}; expected key=value with key in {', '.join(defaults)}"
                             + (f" ({usage})" if positional else ""))
    if positional:
        if not given:
            raise UsageError(f"{prog}: {positional.upper()} missing; {usage}")
        values[positional] = given if many else given[0]
    if overrides:
        values["overrides"] = passed
    return values


_task_started = False


def hydra_task(function: Callable) -> Callable:
    """Mark the start of a `@hydra.main` task (put it under the decorator), so that `run_hydra` can tell Hydra's own
    failures (a bad override or config, reported before the task starts) from the task's; and set up the run log."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        global _task_started
        _task_started = True
        from hpa_lightning.logs import setup_run_logging

        setup_run_logging()
        return function(*args, **kwargs)

    return wrapper


def run_hydra(hydra_main: Callable[[], object]) -> None:
    """Call a `@hydra.main` entry point: Hydra exits 1 on a bad override or config, which is bad input here (2)."""
    try:
        hydra_main()
    except SystemExit as exit_:
        if exit_.code == 1 and not _task_started:
            raise SystemExit(EXIT_BAD_INPUT) from None
        raise
