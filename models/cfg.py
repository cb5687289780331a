"""Darknet cfg files: parse into typed blocks with darknet's defaults, validate, and write back.

A cfg is a ``[net]`` section followed by layer sections. ``ModelCfg.layers[i]`` is darknet's layer
``i``, the index that ``[route] layers=`` and ``[shortcut] from=`` count in. Every block keeps only
the options the file gave (typed), so ``write_cfg(parse_cfg(text))`` is as short as the input and
parse → write → parse is the identity. Defaults come from each layer kind's schema
(:mod:`models.kinds`), copied from darknet's ``parser.c``: a block answers ``block["activation"]``
with the given value or darknet's default.

Anything the parser does not know (a section, a key, an activation, a value of the wrong type) is a
``UserError`` naming the file and line: a misspelt key must never turn into a silent default.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.kinds import KINDS, canonical_name, kind_of
from models.options import NET_SCHEMA, Option, ValueProblem
from utils.errors import UserError
from utils.files import read_text
from utils.outputs import atomic_write


def schema_of(section: str) -> dict[str, Option]:
    """The options of a section type: ``[net]``'s, or the layer kind's."""
    return NET_SCHEMA if section == "net" else kind_of(section).schema


@dataclass(eq=False)
class Block:
    """One cfg section: its type and the options the file gave, typed, in file order."""
    type: str
    options: dict[str, Any] = field(default_factory=dict)
    line: int = 0
    source: str = "<cfg>"

    def __getitem__(self, key: str) -> Any:
        if key in self.options:
            return self.options[key]
        opt = schema_of(self.type).get(key)
        if opt is None:
            raise KeyError(f"[{self.type}] has no option {key!r}")
        return opt.default(self) if callable(opt.default) else opt.default

    def __contains__(self, key: str) -> bool:
        return key in self.options

    def set(self, key: str, value: Any) -> None:
        """Set an option (pruning and class-count changes use this); the key must be in the schema."""
        if key not in schema_of(self.type):
            raise KeyError(f"[{self.type}] has no option {key!r}")
        self.options[key] = value

    def where(self) -> str:
        """``file:line [type]`` for messages."""
        return f"{self.source}:{self.line} [{self.type}]"

    def copy(self) -> Block:
        return Block(self.type, {k: list(v) if isinstance(v, list) else v
                                 for k, v in self.options.items()}, self.line, self.source)

    def __eq__(self, other: object) -> bool:  # where a block came from is not what it means
        return isinstance(other, Block) and (self.type, self.options) == (other.type, other.options)


@dataclass(eq=False)
class ModelCfg:
    """A parsed cfg: the ``[net]`` block and the layer blocks (``layers[i]`` is darknet layer i)."""
    net: Block
    layers: list[Block]
    source: str = "<cfg>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelCfg) and (self.net, self.layers) == (other.net, other.layers)

    def copy(self) -> ModelCfg:
        return ModelCfg(self.net.copy(), [b.copy() for b in self.layers], self.source)

    @property
    def heads(self) -> list[int]:
        """Indices of the head layers (``[yolo]``)."""
        return [i for i, b in enumerate(self.layers) if kind_of(b).head]

    @property
    def classes(self) -> int:
        """The class count of the heads (they must agree)."""
        counts = {self.layers[i]["classes"] for i in self.heads}
        if len(counts) != 1:
            raise UserError(f"{self.source}: the [yolo] heads disagree on classes ({sorted(counts)})"
                            if counts else f"{self.source}: the cfg has no [yolo] head")
        return counts.pop()


def _strip_comment(line: str) -> str:
    for mark in ("#", ";"):
        cut = line.find(mark)
        if cut >= 0:
            line = line[:cut]
    return line.strip()


def parse_cfg(text: str, source: str = "<cfg>") -> ModelCfg:
    """Parse cfg text. Raises UserError naming ``source:line`` for anything darknet would not mean."""
    blocks: list[Block] = []
    given_at: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw)
        if not line:
            continue
        where = f"{source}:{lineno}"
        if line.startswith("["):
            if not line.endswith("]") or len(line) < 3:
                raise UserError(f"{where}: malformed section header {raw.strip()!r}")
            name = canonical_name(line[1:-1].strip())
            if name != "net" and name not in KINDS:
                raise UserError(f"{where}: unknown section [{name}]; this project supports [net], "
                                f"{', '.join(f'[{s}]' for s in KINDS)}")
            blocks.append(Block(name, {}, lineno, source))
            given_at = {}
            continue
        if "=" not in line:
            raise UserError(f"{where}: expected 'key=value' or a [section], got {raw.strip()!r}")
        if not blocks:
            raise UserError(f"{where}: option {raw.strip()!r} comes before the first [section]")
        key, value = (part.strip() for part in line.split("=", 1))
        block = blocks[-1]
        schema = schema_of(block.type)
        if key not in schema:
            if block.type != "net" and key in kind_of(block.type).unsupported:
                raise UserError(f"{where}: [{block.type}] option {key!r} is not supported by this project")
            raise UserError(f"{where}: unknown option {key!r} in [{block.type}]; known: "
                            f"{', '.join(sorted(schema))}")
        if key in given_at:
            raise UserError(f"{where}: option {key!r} given twice in [{block.type}] "
                            f"(first at line {given_at[key]})")
        if value == "":
            raise UserError(f"{where}: option {key!r} has no value")
        try:
            block.options[key] = schema[key].parse(value)
        except ValueProblem as e:
            raise UserError(f"{where}: [{block.type}] {key}={value}: {e}") from None
        given_at[key] = lineno
    if not blocks:
        raise UserError(f"{source}: no sections found; is this a darknet cfg?")
    if blocks[0].type != "net":
        raise UserError(f"{source}:{blocks[0].line}: the first section must be [net], "
                        f"got [{blocks[0].type}]")
    extra_net = [b for b in blocks[1:] if b.type == "net"]
    if extra_net:
        raise UserError(f"{source}:{extra_net[0].line}: a second [net] section")
    if len(blocks) == 1:
        raise UserError(f"{source}: the cfg has a [net] section but no layers")
    cfg = ModelCfg(blocks[0], blocks[1:], source)
    for block in cfg.layers:  # checks within one block; checks across blocks are models/shapes.py's
        kind_of(block).check(block)
    return cfg


def read_cfg(path: str | Path) -> ModelCfg:
    """Read and parse a cfg file."""
    return parse_cfg(read_text(path, "cfg"), str(path))


def format_value(value: Any) -> str:
    """An option value as a cfg file writes it."""
    if isinstance(value, list):
        return ",".join(format_value(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _write_block(block: Block) -> Iterable[str]:
    yield f"[{block.type}]"
    options = dict(block.options)
    if block.type != "net":
        for key in kind_of(block).written_defaults:
            options.setdefault(key, block[key])
    for key, value in options.items():
        yield f"{key}={format_value(value)}"


def write_cfg(cfg: ModelCfg) -> str:
    """Cfg text that darknet, OpenCV and this parser read as ``cfg``."""
    out: list[str] = []
    for i, block in enumerate([cfg.net, *cfg.layers]):
        if i:
            out.append(f"\n# layer {i - 1}")
        out.extend(_write_block(block))
    return "\n".join(out) + "\n"


def save_cfg(cfg: ModelCfg, path: str | Path) -> None:
    atomic_write(path, write_cfg(cfg))
