"""Typed stage configs: dataclasses whose fields are the CLI flags, a config file format, and the
resolved config saved beside every output.

A stage declares ``@dataclass class XConfig`` with fields made by :func:`opt` (a flag) or
:func:`arg` (a positional argument). :func:`config_command` turns it into a click command whose
options are generated from the fields, so flags and config never drift apart. ``--config FILE``
(TOML or YAML) sets fields; flags given on the command line win over the file; unknown keys are
errors, never ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import sys
import tempfile
import types
import typing
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, TypeVar

import click

C = TypeVar("C")


def opt(default: Any = None, help: str = "", *, choices: tuple[str, ...] | None = None,
        short: str | None = None) -> Any:
    """A config field exposed as ``--name`` (underscores become dashes)."""
    meta = {"help": help, "choices": choices, "short": short}
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def arg(default: Any = dataclasses.MISSING, help: str = "") -> Any:
    """A config field exposed as a positional argument (a list field takes one or more)."""
    meta = {"help": help, "positional": True}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda d=default: list(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _resolve_type(cls: type, f: dataclasses.Field) -> tuple[type, bool, bool]:
    """(scalar type, is_list, is_optional) of a field's annotation."""
    hints = typing.get_type_hints(cls)
    tp = hints[f.name]
    optional = False
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        tp = args[0]
        origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return typing.get_args(tp)[0], True, optional
    return tp, False, optional


def _coerce(value: Any, scalar: type, is_list: bool, name: str) -> Any:
    if value is None:
        return None
    if is_list:
        if isinstance(value, (str, Path)):
            value = [value]
        return [_coerce(v, scalar, False, name) for v in value]
    # A file's list or table for a one-value option is a mistake, not a string to parse:
    # str([0, 0.3]) would reach the stage as "[0, 0.3]" and fail far from the file's key.
    if isinstance(value, (list, tuple, dict)):
        hint = (f"; write a list as one string, e.g. {','.join(map(str, value))!r}"
                if isinstance(value, (list, tuple)) and scalar is str else "")
        raise ConfigError(f"{name}: expected one {scalar.__name__}, got {value!r}{hint}")
    # int(True) == 1 and int(32.7) == 32: a TOML/YAML boolean or a fractional number for an
    # integer option (or a boolean for a float) would be silently turned into another value.
    if scalar in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{name}: expected {scalar.__name__}, got {value!r}")
    if scalar is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{name}: expected int, got {value!r}")
    if scalar is Path:
        if not isinstance(value, (str, os.PathLike)):  # Path(5) is a TypeError traceback
            raise ConfigError(f"{name}: expected a path (a string), got {value!r}")
        return Path(value)
    if scalar is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ConfigError(f"{name}: expected a boolean, got {value!r}")
        return bool(value)
    if scalar in (int, float, str):
        try:
            return scalar(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: expected {scalar.__name__}, got {value!r}") from e
    return value


class ConfigError(click.UsageError):
    """A bad config value or file; the message names the flag or key."""


class InputError(click.ClickException, ValueError):
    """Bad input found while a stage runs (a file, a line, a flag): the CLI prints the message
    as ``Error: ...`` without a traceback; library callers catch it as a ``ValueError``. Each
    stage's input error derives from it."""


def _yaml_load(text: str) -> Any:
    """``yaml.safe_load`` without YAML 1.1's base-60 numbers: PyYAML reads merge's ``alpha_grid:
    0:1:0.1`` as the float 60.1 (0*3600 + 1*60 + 0.1). Such a value stays a string, as in YAML 1.2
    and TOML; every other scalar resolves as safe_load resolves it."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    numeric = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    base60 = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
    Loader.yaml_implicit_resolvers = {
        first: [(tag, re.compile(f"(?!{base60.pattern})(?:{rx.pattern})", rx.flags)
                 if tag in numeric else rx) for tag, rx in resolvers]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    return yaml.load(text, Loader=Loader)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml), YAML (.yaml/.yml) or JSON (.json) mapping of field names to values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path}: use .toml, .yaml, .yml or .json")
    # A typo in the file (or a file that is not text) was a parser's traceback; the parsers'
    # own messages say the line and column, so they are passed on under the file's name.
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path}: not UTF-8 text ({e.reason} at byte "
                          f"{e.start})") from e
    if path.suffix == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10: the same parser as the tomli backport
            import tomli as tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path}: not valid TOML: {e}") from e
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path}: not valid JSON: {e}") from e
    else:
        import yaml

        try:
            data = _yaml_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return data


def build_config(cls: type[C], values: dict[str, Any], source: str = "config") -> C:
    """Make ``cls`` from a mapping (dashes or underscores), rejecting unknown keys."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise ConfigError(f"{source}: unknown key {key!r} for {cls.__name__}; "
                              f"known: {', '.join(sorted(known))}")
        scalar, is_list, optional = _resolve_type(cls, known[name])
        # A YAML `~`/`null` (or JSON null) for a field with no "unset" meaning reached the stage
        # as None and failed there as an AttributeError or TypeError traceback (`out: null` for
        # the tokenizer, `vocab_size: ~`), far from the file's key.
        if (value is None and not optional) or (
                is_list and isinstance(value, (list, tuple)) and any(v is None for v in value)):
            raise ConfigError(f"{source}: {key} is null{' or holds a null' if is_list else ''}; "
                              "give a value, or leave the key out for its default")
        kwargs[name] = _coerce(value, scalar, is_list, f"{source}: {key}")
        # click checks a flag's choices; a file's value must be checked here, or e.g. merge's
        # `dtype = "bf16"` passed validation and failed as a KeyError deep in the stage
        choices = known[name].metadata.get("choices")
        given = kwargs[name] if is_list else [kwargs[name]]
        if choices and any(v is not None and v not in choices for v in given):
            raise ConfigError(f"{source}: {key} must be one of {', '.join(choices)}, "
                              f"got {value!r}")
    missing = [f for f in known.values() if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError("missing " + ", ".join(
            f"{f.name.upper()} (a positional argument, or `{f.name}` in the --config file)"
            if f.metadata.get("positional") else f"--{f.name.replace('_', '-')}"
            for f in missing))
    return cls(**kwargs)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (paths as strings)."""
    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if dataclasses.is_dataclass(v):
            return config_to_dict(v)
        return v

    return {f.name: conv(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def current_umask() -> int:
    """The process's umask (Linux reads it without changing it; elsewhere set and restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_modes(path: str | Path) -> None:
    """Give ``path`` (a file, or a folder and everything in it) the modes a plain ``open`` or
    ``mkdir`` would: mkstemp, mkdtemp and safetensors' writer (a private temporary file renamed
    into place) make them 0600/0700, and a checkpoint or results file shared on a cluster was
    unreadable by the rest of the group."""
    mask = current_umask()
    path = Path(path)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's file is private (0600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_config(cfg: Any, path: str | Path, **extra: Any) -> None:
    """Save the resolved config (plus versions and ``extra``) as JSON beside an output."""
    from babymerge import __version__

    record = {"stage_config": type(cfg).__name__, "babymerge_version": __version__,
              "python": sys.version.split()[0], "config": config_to_dict(cfg), **extra}
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=False) + "\n")


def _click_params(cls: type) -> list[click.Parameter]:
    params: list[click.Parameter] = []
    for f in dataclasses.fields(cls):
        scalar, is_list, optional = _resolve_type(cls, f)
        meta = f.metadata
        click_type: Any = {Path: click.Path(path_type=Path), int: int, float: float,
                           bool: bool}.get(scalar, str)
        if meta.get("choices"):
            click_type = click.Choice(list(meta["choices"]))
        if meta.get("positional"):
            # never required on the click side: ``--config FILE`` may set it (README's
            # ``extract-features --config configs/paper/extract.toml`` has no SOURCE on the
            # command line); build_config reports it missing from both, by name
            params.append(click.Argument([f.name], type=click_type, nargs=-1 if is_list else 1,
                                         required=False))
            continue
        flag = "--" + f.name.replace("_", "-")
        names = [flag] + ([meta["short"]] if meta.get("short") else [])
        # defaults stay None on the click side so that a config file value is not overridden by
        # a default nobody typed; the dataclass holds the real default.
        if scalar is bool and not is_list:
            names = [f"{flag}/--no-{f.name.replace('_', '-')}"]
            params.append(click.Option([*names, f.name], default=None, help=meta.get("help", "")
                                       + f"  [default: {f.default}]"))
        else:
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            params.append(click.Option([*names, f.name], type=click_type, multiple=is_list,
                                       default=None,
                                       help=meta.get("help", "") + (f"  [default: {shown}]"
                                                                    if shown not in (None, "")
                                                                    else "")))
    params.append(click.Option(["--config", "config_file"], type=click.Path(path_type=Path),
                               default=None,
                               help="TOML/YAML/JSON file setting any of these options (flags win; "
                               "its relative paths are from the current directory, as on the "
                               "command line, not from the file)"))
    return params


# HDF5 and safetensors' writer report the machine's refusal inside the text of their own
# exceptions (on a full tmpfs: h5py's RuntimeError "... errno = 28 ...", SafetensorError
# "... (os error 28)"); the number is what says "disk full".
_ERRNO_IN_TEXT = re.compile(r"errno = (\d+)|os error (\d+)")
_FILENAME_IN_TEXT = re.compile(r"filename = '([^']+)'")


def machine_refusal(e: Exception) -> OSError | None:
    """The OSError behind ``e`` when the machine refused a read or write, else None."""
    text = str(e)
    found = _ERRNO_IN_TEXT.search(text)
    code = e.errno if isinstance(e, OSError) and e.errno is not None else (
        int(found.group(1) or found.group(2)) if found else None)
    if code is None:
        return e if isinstance(e, OSError) else None
    named = _FILENAME_IN_TEXT.search(text)
    filename = getattr(e, "filename", None) or (named.group(1) if named else None)
    return OSError(code, os.strerror(code), filename)


def describe_os_error(e: OSError, command: str, out: Path | None = None) -> str:
    """One line for an OSError a stage met writing or reading: what, where, and the way on."""
    where = e.filename or (f"under {out}" if out is not None else "a file")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"disk full writing {where} ({e.strerror}); free space, then run the same "
                f"{command} command: it goes on from what it had saved")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write {where}: {e.strerror} (read-only or not yours); choose another "
                "--out")
    return f"{where}: {e.strerror or e}"


def output_folder(path: Path, flag: str = "--out") -> Path:
    """``path`` as a folder to write into, created if missing; an existing file there is one
    error naming it (mkdir's FileExistsError was a traceback)."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{flag} {path}: a file, not a folder; give a folder path")
    path.mkdir(parents=True, exist_ok=True)
    return path


def config_command(name: str, cls: type[C], run: Callable[[C], Any], help: str) -> click.Command:
    """A click command ``name``: parse flags (and --config) into ``cls``, then ``run(cfg)``."""

    def callback(**kwargs: Any) -> Any:
        config_file = kwargs.pop("config_file")
        values = load_config_file(config_file) if config_file else {}
        for key, value in kwargs.items():
            if value is None or (isinstance(value, tuple) and len(value) == 0):
                continue
            values[key] = list(value) if isinstance(value, tuple) else value
        try:
            cfg = build_config(cls, values, source=str(config_file) if config_file else "options")
        except ValueError as e:  # validation in __post_init__
            raise click.UsageError(str(e)) from e
        try:
            return run(cfg)
        except click.ClickException:
            raise
        except Exception as e:  # the machine's refusal (disk full, read-only): one line
            refusal = machine_refusal(e)
            if refusal is None:
                raise
            raise click.ClickException(describe_os_error(refusal, name,
                                                         getattr(cfg, "out", None))) from e

    # click shows no help for positional arguments: without this, e.g. extract-features' SOURCE
    # forms (a datasets folder, quoted {000..009} shard ranges) were in no --help at all
    positional = [f"{f.name.upper()}: {f.metadata['help']}" for f in dataclasses.fields(cls)
                  if f.metadata.get("positional") and f.metadata.get("help")]
    full_help = "\n\n".join([help, *positional])
    return click.Command(name, callback=callback, params=_click_params(cls), help=full_help)


@contextlib.contextmanager
def exclusive(lock_path: Path, command: str, error: type[InputError] = InputError
              ) -> Iterator[None]:
    """One writer per output: a second ``command`` run on the same output fails, naming the
    holder's PID, instead of interleaving its writes (two merges into one --out interleaved
    metrics.jsonl). The lock is the OS's (flock): a killed holder releases it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:  # not "w": that would erase the holder's PID
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise error(f"another {command} run (PID {holder}) is writing {lock_path.parent}; "
                        "wait for it, or use another --out") from e
        except OSError as e:
            # Cluster file systems mounted without lock support (Lustre's noflock: ENOSYS; NFS
            # without lockd: ENOLCK) refuse every flock. The lock only guards against a second
            # run on the same output, so its absence is said, not fatal.
            warnings.warn(f"cannot lock {lock_path} ({e.strerror or e}): this file system has "
                          f"no file locks; make sure no other {command} run writes the same "
                          "output", stacklevel=3)
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        yield
