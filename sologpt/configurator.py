"""Typed configuration: dataclass defaults, then Python config files, then --key=value flags.

    python train.py config/small.py --batch_size=32 --compile=False

A config file is plain Python that only assigns names; it runs in its own namespace (runpy), never in
the script's globals. Config files are trusted code: run only files you would run as a script.
Every public name a file assigns, and every flag, must be a field of the dataclass, and its value must
have the field's type (an int may stand for a float; a bool is never an int), and a float must be finite. Mistakes
raise UserError with one line that says what is wrong and how to fix it. The scripts that take argparse flags instead
(prepare/, tools/quantize.py, bench/) use ArgumentParser below, which keeps the same one-line convention.
"""

import argparse
import ast
import dataclasses
import difflib
import inspect
import math
import runpy
import sys
import types
import typing
from pathlib import Path


class UserError(Exception):
    """An expected mistake by the user: the scripts print its message as one line and exit non-zero."""


def load_config(cls, argv):
    """Build a cls instance from defaults, then config files, then --key=value flags, in argv order.
    -h or --help prints every field with its default and comment, then exits."""
    if "-h" in argv or "--help" in argv:
        print(help_text(cls))
        raise SystemExit(0)
    cfg = cls()
    hints = typing.get_type_hints(cls)
    for arg in argv:
        if arg.startswith("--"):
            key, eq, text = arg[2:].partition("=")
            if not eq:
                raise UserError(f"flag {arg!r} has no value: write --{key}=VALUE")
            value = _parse(text)
            if key in hints and str in _allowed(hints[key]) and type(value) not in _allowed(hints[key]):
                value = text  # --start=1 for a str field means the string "1"
            elif key in hints and float in _allowed(hints[key]) and text.strip().lower() in NON_FINITE:
                value = float(text)  # --min_lr=nan is a float (which check_type then refuses), not the string "nan"
            _set(cfg, hints, key, value, f"flag {arg!r}")
        else:
            path = Path(arg)
            if not path.is_file():
                raise UserError(f"config file {arg} does not exist: check the path (config files live in config/)")
            try:
                names = runpy.run_path(str(path))
            except Exception as e:  # a syntax error or an exception inside the file
                raise UserError(f"config file {arg} failed: {type(e).__name__}: {e}")
            for key, value in names.items():
                if key.startswith("_") or isinstance(value, types.ModuleType):
                    continue  # private helpers and imported modules are not settings
                if key not in hints and key == "search_dir" or key in hints and isinstance(value, list) and not any(
                        (typing.get_origin(t) or t) is list for t in _allowed(hints[key])):  # lists to try: a search
                    raise UserError(f"config file {arg} is a search space ({key} = {value!r}): run it with "
                                    f"python -m tools.search {arg}")
                _set(cfg, hints, key, value, f"config file {arg}")
    return cfg


def run_cli(fn, cls=None, argv=None):
    """A script's main(): fn(load_config(cls, argv)), or fn(argv) itself without a config class (the tools that
    parse their own arguments), argv defaulting to the command line; a UserError prints one line, "error: ...",
    and exits with status 1; Ctrl-C that reaches it (train.py's second one) one line and status 130, as a shell
    reports an interrupted command."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        return fn(load_config(cls, argv) if cls is not None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        print(f"error: {e or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        sys.exit(130)


def help_text(cls):
    """The fields of a config dataclass as the source writes them (name, type, default, comment), section
    comments included: the class body is the documentation."""
    lines = inspect.getsource(cls).splitlines()
    body = [line.strip() for line in lines
            if line.strip() and not line.strip().startswith(('"""', "@", "class "))]
    usage = "every field below can be set in a config file or as --key=value (files first, then flags, in order)"
    return "\n".join([f"{cls.__name__}: {usage}", *("  " + line for line in body)])


NON_FINITE = ("nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity")


def _parse(text):
    """'3' -> 3, '1e-3' -> 0.001, 'True' -> True, 'None' -> None; anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _set(cfg, hints, key, value, where):
    if key not in hints:
        close = difflib.get_close_matches(key, hints, n=1)
        hint = f": did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(hints))}"
        raise UserError(f"unknown config key {key!r} in {where}{hint}")
    setattr(cfg, key, check_type(key, value, hints[key], where))


def check_type(key, value, typ, where="config"):
    """Return value converted to typ (only int -> float widening), or raise UserError."""
    allowed = _allowed(typ)
    for t in allowed:
        if t is type(None) and value is None:
            return None
        if t is float and type(value) in (int, float):  # an int may stand for a float
            number = float(value) if abs(value) <= sys.float_info.max else math.inf  # (an int beyond its range)
            if not math.isfinite(number):  # no setting means anything at infinity; NaN passes every range check
                raise UserError(f"{key}={value!r} in {where} must be a finite number")
            return number
        if t is not type(None) and type(value) is t:
            return value
    names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
    hint = " (strings on the command line need no quotes, but numbers are read as numbers)" if str in allowed else ""
    raise UserError(f"{key}={value!r} in {where} has type {type(value).__name__}, expected {names}{hint}")


def _allowed(typ):
    """The types a field accepts: (int,) for int, (int, str) for int | str."""
    union = isinstance(typ, types.UnionType) or typing.get_origin(typ) is typing.Union
    return typing.get_args(typ) if union else (typ,)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the scripts that take --flag VALUE arguments, with the one-line convention: a bad argument prints
    "error: <argparse's message> (see PROG --help)" and exits with status 1, instead of the usage text and status 2."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(1)


def print_config(cfg, title):
    print(f"{title}:")
    for key, value in dataclasses.asdict(cfg).items():
        print(f"  {key} = {value!r}")


def resolve_auto_bool(key, value, auto_value):
    """A field that takes True, False or "auto" (replaced by auto_value)."""
    value = auto_value if value == "auto" else value
    if not isinstance(value, bool):
        raise UserError(f"{key}={value!r} is unknown: use True, False or 'auto'")
    return value
