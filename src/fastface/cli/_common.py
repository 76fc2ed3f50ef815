"""What every ``fastface`` command shares: exit codes, errors, JSON output, paths, progress.

Exit codes
----------
0 success (also when a reader such as ``head`` closes the pipe early: the
output was cut by the reader's choice, not by an error); 1 a runtime error
(damaged or missing data, a refused operation, a full disk); 2 a usage error
(a bad option, a missing input file, an output path with the wrong suffix),
always reported before any work starts.

Errors are one line on stderr, ``fastface COMMAND: error: MESSAGE``, naming
the file or option at fault; ``--debug`` adds the traceback.

JSON
----
Output is strict JSON (no ``NaN``/``Infinity``): a score that does not exist
(a padded result) is left out, and other non-finite numbers become ``null``.
Streams of records (search results with ``-o x.jsonl``, dedup groups, audit
entries) are JSON lines, one object per line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sqlite3
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np

__all__ = [
    "EXIT_ERROR",
    "EXIT_OK",
    "EXIT_USAGE",
    "Formatter",
    "UsageError",
    "add_progress_flags",
    "dump_json",
    "dumps_jsonl",
    "input_file",
    "jsonable",
    "output_file",
    "progress_wanted",
    "run",
    "write_json",
    "write_jsonl",
]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

log = logging.getLogger("fastface.cli")


class UsageError(Exception):
    """A command line that cannot be run as given (exit code 2)."""


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` keeps description line breaks and shows every default."""


# --- argument types: checked by argparse, so a bad path is a usage error before any work ------
def input_file(suffixes: Sequence[str] | None = None) -> Callable[[str], Path]:
    """An argparse ``type`` for an existing input file (optionally with one of ``suffixes``)."""

    def check(value: str) -> Path:
        p = Path(value)
        if suffixes is not None and p.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(
                f"{value}: expected a {' or '.join(suffixes)} file, got suffix {p.suffix!r}"
            )
        if not p.exists():
            raise argparse.ArgumentTypeError(f"{value}: no such file")
        if not p.is_file():
            raise argparse.ArgumentTypeError(f"{value}: not a regular file")
        return p

    return check


def output_file(suffixes: Sequence[str]) -> Callable[[str], Path]:
    """An argparse ``type`` for an output file: known suffix, existing parent directory."""

    def check(value: str) -> Path:
        p = Path(value)
        if p.suffix.lower() not in suffixes:
            raise argparse.ArgumentTypeError(
                f"{value}: the output must end in {' or '.join(suffixes)}"
            )
        if not p.parent.is_dir():
            raise argparse.ArgumentTypeError(f"{value}: directory {p.parent} does not exist")
        if p.is_dir():
            raise argparse.ArgumentTypeError(f"{value}: is a directory")
        return p

    return check


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def add_progress_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="show progress bars (default: when stderr is a terminal)",
    )
    g.add_argument(
        "--no-progress",
        "--quiet",
        dest="progress",
        action="store_false",
        help="no progress bars",
    )


def progress_wanted(args: argparse.Namespace) -> bool:
    value = getattr(args, "progress", None)
    if value is None:
        return sys.stderr.isatty()
    return bool(value)


# --- JSON ------------------------------------------------------------------------------------
def jsonable(obj: Any) -> Any:
    """Plain JSON values from NumPy scalars/arrays, paths and non-finite floats (as ``None``)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_json(obj: Any, *, indent: int | None = 2) -> str:
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False, sort_keys=False)


def dumps_jsonl(rows: Iterable[Any]) -> Iterable[str]:
    for row in rows:
        yield json.dumps(jsonable(row), allow_nan=False) + "\n"


def write_json(obj: Any, out: TextIO | None = None, *, indent: int | None = 2) -> None:
    (out or sys.stdout).write(dump_json(obj, indent=indent) + "\n")


def write_jsonl(rows: Iterable[Any], out: TextIO | None = None) -> None:
    stream = out or sys.stdout
    for line in dumps_jsonl(rows):
        stream.write(line)


# --- running a command -----------------------------------------------------------------------
# Library errors name Python arguments ("nprobe=64 exceeds nlist=32", "k: expected ...");
# the command line says the flag the user typed instead.
_FLAGS = {
    "k": "-k",
    "nprobe": "--nprobe",
    "nlist": "--nlist",
    "M": "--M",
    "d": "--d",
    "nbits": "--nbits",
    "rerank": "--rerank",
    "shard_size": "--shard-size",
    "chunk_size": "--chunk-size",
    "max_points": "--train-size",
}
_ARG = re.compile(r"(?<![\w-])(" + "|".join(_FLAGS) + r")(=|: )")


def flag_message(message: str) -> str:
    """``nprobe=64 exceeds nlist=32`` -> ``--nprobe 64 exceeds --nlist 32``."""
    return _ARG.sub(
        lambda m: f"{_FLAGS[m.group(1)]} " if m.group(2) == "=" else f"{_FLAGS[m.group(1)]}: ",
        message,
    )


def _one_line(e: BaseException, args: argparse.Namespace) -> str:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    text = flag_message(" ".join(str(msg).split())) or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    elif isinstance(e, sqlite3.DatabaseError):
        # SQLite's messages name no file ("file is not a database"): name the gallery
        where = getattr(args, "path", None)
        if where is not None and str(where) not in text:
            text = f"{where}: {text}"
    return text


def run(args: argparse.Namespace, name: str) -> int:
    """Run ``args.func(args)`` with the exit-code and error conventions above."""
    from ..errors import FastfaceError

    try:
        try:
            code = int(args.func(args))
            sys.stdout.flush()
            return code
        except UsageError as e:
            if args.debug:
                raise
            print(f"fastface {name}: error: {_one_line(e, args)}", file=sys.stderr)
            return EXIT_USAGE
        except BrokenPipeError:
            raise
        except KeyboardInterrupt:
            print(f"fastface {name}: interrupted", file=sys.stderr)
            return 130
        except (
            FastfaceError,
            OSError,
            ValueError,
            TypeError,
            LookupError,
            RuntimeError,
            sqlite3.DatabaseError,
            NotImplementedError,
            ImportError,  # an optional dependency (extra) that is not installed
        ) as e:
            if args.debug:
                raise
            print(f"fastface {name}: error: {_one_line(e, args)}", file=sys.stderr)
            return EXIT_ERROR
    except BrokenPipeError:
        # the reader went away (``fastface info IDX | head``): stop quietly. Point stdout
        # at /dev/null so that the interpreter's final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_OK


def setup_logging(verbose: int) -> None:
    """Library messages (logger ``fastface``) to stderr: warnings by default, -v info, -vv debug."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logger = logging.getLogger("fastface")
    if not any(getattr(h, "_fastface_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("fastface: %(levelname)s: %(message)s"))
        handler._fastface_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(level)
