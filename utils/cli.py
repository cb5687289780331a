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
from collections.abc import Callable
from dataclasses import dataclass

from utils.errors import UserError


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``error: <prog>: <message>`` and exit status 2."""

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
SPARSITY = float_range(0.0, 1.0)  # BN-L1 rate s
RATIO_ABOVE_1 = float_range(1.0, 1e3, lo_open=True)  # anchor/box size ratio threshold


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
