"""Command-line plumbing shared by the scripts: the parser, the numeric flag types, ``run_cli``.

Every script builds its parser with :class:`Parser`, so a bad command line is one line on stderr and
exit status 2 (argparse's usage dump is left to ``--help``), and an unknown flag names the closest
valid one. Every numeric flag takes one of the bounded types below, declared once per kind of value:
zero, negative, NaN or absurdly large values are refused while the command line is read, naming the
flag, before anything is loaded or written.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from utils.errors import UserError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``error: <prog>: <message>`` and exit status 2; the
    description (a script's docstring) is shown as written."""

    def __init__(self, *args: Any, **kw: Any):
        kw.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kw)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        return super().parse_known_args(self.respell(sys.argv[1:] if args is None else list(args)),
                                        namespace)

    def respell(self, args: list[str]) -> list[str]:
        """Underscores and dashes are interchangeable in long flags (``--img_size`` is ``--img-size``,
        ``--bn_fold`` is ``--BN_Fold``), as the older tools spelled them; a flag given exactly as
        declared is left alone."""
        known = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        by_key = {_spelling(s): s for s in known}
        out = []
        for arg in args:
            flag, eq, value = arg.partition("=")
            if flag.startswith("--") and flag not in known and _spelling(flag) in by_key:
                arg = by_key[_spelling(flag)] + eq + value
            out.append(arg)
        return out

    def error(self, message: str) -> None:  # type: ignore[override]
        if message.startswith("unrecognized arguments:"):
            message += self._suggestion(message.split(":", 1)[1].split())
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")

    def _suggestion(self, unknown: list[str]) -> str:
        known = [s for a in self._actions for s in a.option_strings]
        for arg in unknown:
            if arg.startswith("-"):
                flag = arg.split("=", 1)[0]
                close = difflib.get_close_matches(flag.replace("_", "-"), known, n=1, cutoff=0.6)
                if close:
                    return f"; did you mean {close[0]}?"
        return ""


def _spelling(flag: str) -> str:
    """What a long flag means regardless of case and of underscores or dashes."""
    return flag.replace("_", "-").lower()


@dataclass(frozen=True)
class Bounded:
    """A numeric flag type: ``kind`` (int or float) within [lo, hi] (open ends with ``lo_open``/
    ``hi_open``); ``extra`` are single values allowed outside the range (e.g. -1 for "never")."""

    kind: type
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    extra: tuple[float, ...] = ()
    meaning: str = ""  # said in the error, e.g. "-1: never"

    @property
    def __name__(self) -> str:  # argparse names the type in some messages
        return self.kind.__name__

    def describe(self) -> str:
        lo, hi = (f"{int(v)}" if self.kind is int else f"{v:g}" for v in (self.lo, self.hi))
        if self.kind is int:
            text = f"an integer from {lo} to {hi}"
        else:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            text = f"a number in {left}{lo}, {hi}{right}"
        if self.extra:
            text += " or " + " or ".join(f"{v:g}" for v in self.extra)
        return text + (f" ({self.meaning})" if self.meaning else "")

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {self.describe()}") from None
        if value in self.extra:
            return value
        ok = math.isfinite(value) and (self.lo < value if self.lo_open else self.lo <= value) and \
            (value < self.hi if self.hi_open else value <= self.hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"{text} is not {self.describe()}")
        return value


def int_range(lo: int, hi: int, extra: tuple[int, ...] = (), meaning: str = "") -> Bounded:
    return Bounded(int, lo, hi, extra=extra, meaning=meaning)


def float_range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Bounded:
    return Bounded(float, lo, hi, lo_open, hi_open)


# the kinds of numbers the scripts take; a flag uses one of these (tests/test_cli.py checks every flag)
IMG_SIZE = int_range(1, 8192)  # pixels; the model's stride is checked once the model is known
BATCH = int_range(1, 4096)
EPOCHS = int_range(1, 100_000)
COUNT = int_range(1, 10_000_000)  # images, runs, detections, generations, anchors
COUNT0 = int_range(0, 10_000_000)  # the same where 0 means none
WORKERS = int_range(0, 256)
SEED = int_range(0, 2**32 - 1)
EPOCH_OR_NEVER = int_range(0, 100_000, extra=(-1,), meaning="-1: never")
BITS = int_range(2, 16)  # which widths a quantizer supports is checked where it is built
OPSET = int_range(11, 20)  # the TorchScript exporter's range from Resize on; INT8 needs 13+
MULTIPLE = int_range(1, 1024)  # channel rounding
FRACTION = float_range(0.0, 1.0)  # shares, thresholds, probabilities
SHARE_BELOW_1 = float_range(0.0, 1.0, hi_open=True)  # a share that must leave something (prune percent)
PERCENTILE = float_range(50.0, 100.0)
POSITIVE = float_range(0.0, 1e6, lo_open=True)  # temperatures, ranges
NONNEGATIVE = float_range(0.0, 1e6)  # loss weights, margins, rates
SPARSITY = float_range(0.0, 100.0)  # BN-L1 rate s (proximal: a multiple of lr0 per step)
RATIO_ABOVE_1 = float_range(1.0, 1e3, lo_open=True)  # anchor/box size ratio threshold


# ------------------------------------------------------------------ options declared once, as dataclasses

def option(default: Any, *flags: str, type: Callable[[str], Any] | None = None, help: str = "",
           choices: Sequence[Any] | None = None, nargs: str | None = None, metavar: str | None = None,
           negatable: bool = False, factory: Callable[[], Any] | None = None, const: Any = None,
           required: bool = False) -> Any:
    """A dataclass field that is also a command-line flag: its names (the first ``--long`` one is
    written in command lines), its type (one of the bounded kinds above for numbers), help and choices.
    A bool field is a switch (``negatable``: ``--x``/``--no-x``). ``required`` applies to command lines
    (a pipeline sets such fields itself). Parsers (:func:`add_options`),
    recipes (:func:`from_mapping`) and recorded command lines (:func:`to_argv`) all read it."""
    meta = {"flags": flags, "type": type, "help": help, "choices": choices, "nargs": nargs,
            "metavar": metavar, "negatable": negatable, "const": const, "required": required}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_fields(cls: type) -> list[Field]:
    return [f for f in fields(cls) if f.metadata.get("flags")]


def _default(f: Field) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _value_type(f: Field) -> Callable[[str], Any]:
    """How one value of the flag is read: its declared type, else its default's (str for None)."""
    default = _default(f)
    if f.metadata["type"] is not None:
        return f.metadata["type"]
    if isinstance(default, list):
        return type(default[0]) if default else str
    return str if default is None else type(default)


def add_options(parser: argparse.ArgumentParser, cls: type, title: str | None = None,
                only: Callable[[str], bool] = lambda name: True) -> None:
    """Add the flags of the dataclass ``cls`` (those ``only`` accepts by field name) to ``parser``."""
    target = parser.add_argument_group(title) if title else parser
    for f in flag_fields(cls):
        if not only(f.name):
            continue
        m, default = f.metadata, _default(f)
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": m["help"] or None,
                              "required": m["required"] or None}
        if isinstance(default, bool) and m["type"] is None:
            kw["action"] = argparse.BooleanOptionalAction if m["negatable"] else "store_true"
        else:
            kw.update(type=_value_type(f), choices=m["choices"], nargs=m["nargs"], metavar=m["metavar"],
                      const=m["const"])
        target.add_argument(*m["flags"], **{k: v for k, v in kw.items() if v is not None or k == "default"})


def options_parser(prog: str, description: str, *groups: type | tuple[type, str | None],
                   only: Callable[[str], bool] = lambda name: True) -> Parser:
    """The parser of a script whose flags are the option dataclasses ``groups`` (a class, or a class
    with a help-group title)."""
    p = Parser(prog=prog, description=description)
    for group in groups:
        cls, title = group if isinstance(group, tuple) else (group, None)
        add_options(p, cls, title, only)
    return p


def from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    """The dataclass ``cls`` from the parsed flags it declares (other fields keep their defaults)."""
    return cls(**{f.name: getattr(ns, f.name) for f in flag_fields(cls) if hasattr(ns, f.name)})


def _key(name: str) -> str:
    return name.lstrip("-").replace("-", "_")


def find_field(classes: Sequence[type], key: str) -> tuple[type, Field] | None:
    """The dataclass and field that a recipe key names: a field name or any of its flags, with
    dashes or underscores (``sr-schedule``, ``sr_schedule``, ``KDstr``, ``kd-str``)."""
    for cls in classes:
        for f in flag_fields(cls):
            if _key(key) == f.name or _key(key) in {_key(x) for x in f.metadata["flags"]}:
                return cls, f
    return None


def values_from_mapping(classes: Sequence[type], mapping: Any, where: str, prog: str,
                        only: Callable[[str], bool] = lambda name: True) -> dict[type, dict[str, Any]]:
    """Recipe keys (flag names, dashes or underscores) → checked values per dataclass of ``classes``;
    a key that names no flag (or one ``only`` refuses) is one line naming ``prog``'s flags."""
    values: dict[type, dict[str, Any]] = {cls: {} for cls in classes}
    for key, value in mapping.items():
        found = find_field(classes, key)
        if found is None or not only(found[1].name):
            known = sorted(f.metadata["flags"][-1].lstrip("-") for cls in classes for f in flag_fields(cls)
                           if only(f.name))
            raise UserError(f"{where}: '{key}' is not a flag of {prog} (flags: {', '.join(known)})")
        cls, f = found
        values[cls][f.name] = convert(f, value, where)
    return values


def convert(f: Field, value: Any, where: str) -> Any:
    """A recipe value for field ``f``, checked as the command line checks it; a bad one is one line."""
    m, default = f.metadata, _default(f)
    name = m["flags"][0]
    if isinstance(default, bool) and m["type"] is None:
        if not isinstance(value, bool):
            raise UserError(f"{where}: '{name.lstrip('-')}' takes true or false, not {value!r}")
        return value
    if isinstance(value, (dict, bool)) or value is None:
        raise UserError(f"{where}: '{name.lstrip('-')}' takes a value, not {value!r}")
    many = m["nargs"] in ("+", "*")
    values = value if isinstance(value, list) else [value]
    if len(values) > 1 and not many:
        raise UserError(f"{where}: '{name.lstrip('-')}' takes one value, not {value!r}")
    kind = _value_type(f)
    out = []
    for v in values:
        try:
            x = kind(str(v))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise UserError(f"{where}: '{name.lstrip('-')}': {e or v!r}") from None
        if m["choices"] is not None and x not in m["choices"]:
            raise UserError(f"{where}: '{name.lstrip('-')}' must be one of "
                            f"{', '.join(map(str, m['choices']))}, not {v!r}")
        out.append(x)
    return out if many else out[0]


def given_flags(obj: Any, names: Sequence[str] | None = None) -> list[str]:
    """The flags of the dataclass ``obj`` (those of the fields ``names``, default all) set to something
    other than their default."""
    return [f.metadata["flags"][0] for f in flag_fields(type(obj))
            if (names is None or f.name in names) and getattr(obj, f.name) != _default(f)]


def refuse_unused(obj: Any, switched_on: bool, switch: str, exempt: Sequence[str] = ()) -> None:
    """A flag of ``obj``'s group given while the group's technique is off would do nothing: one line
    naming it and the ``switch`` that turns the technique on."""
    if switched_on:
        return
    unused = given_flags(obj, [f.name for f in flag_fields(type(obj)) if f.name not in exempt])
    if unused:
        raise UserError(f"{', '.join(unused)}: does nothing without {switch}")


def to_argv(obj: Any) -> list[str]:
    """The flags that reproduce the dataclass ``obj`` on a command line (fields at their default left out)."""
    argv: list[str] = []
    for f in flag_fields(type(obj)):
        value, default, m = getattr(obj, f.name), _default(f), f.metadata
        if value == default:
            continue
        flag_name = next((x for x in m["flags"] if x.startswith("--")), m["flags"][0])
        if isinstance(default, bool) and m["type"] is None:
            argv.append(flag_name if value else "--no-" + flag_name[2:])
        elif isinstance(value, list):
            argv += [flag_name, *map(str, value)]
        else:
            argv += [flag_name, str(value)]
    return argv


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Run a script's ``main``; a UserError or a full disk becomes one line on stderr and status 2."""
    try:
        main(argv)
    except SystemExit as e:  # argparse has printed its one line (or --help)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"error: no space left on the device while writing {e.filename or 'a file'}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
