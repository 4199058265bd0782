"""Prompt specs in GenEval's metadata format, one JSON object a line.

```
{"tag": "position", "prompt": "a photo of a square right of a circle",
 "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1, "position": ["right of", 0]}]}
```

The parser accepts any class and color words (real GenEval files name COCO classes); whether a spec
fits ShapeWorld's vocabulary is the verifier's question. Keys the format does not define are kept in
`PromptSpec.extra` and written back, so nothing read is lost. Every error names `file:line` and the
field (`include[1].count`) with what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from avr.world.scene import COLORS, RELATIONS, SHAPES

#: The most objects ShapeWorld draws in one image (prompts and scenes stay within it).
MAX_OBJECTS = 8

_CLAUSE_KEYS = frozenset({"class", "count", "color", "position"})
_SPEC_KEYS = frozenset({"tag", "prompt", "include", "exclude"})


class SpecError(ValueError):
    """A spec line that does not follow the format; the message names where and what was expected."""


@dataclass(frozen=True)
class Clause:
    """One `include`/`exclude` entry: at least (include) or fewer than (exclude) `count` objects of
    `cls`, optionally of `color`, optionally placed `position = (relation, index of another include)`."""

    cls: str
    count: int = 1
    color: str | None = None
    position: tuple[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        """GenEval's dict form (key order as GenEval writes it)."""
        out: dict[str, Any] = {"class": self.cls, "count": self.count}
        if self.color is not None:
            out["color"] = self.color
        if self.position is not None:
            out["position"] = [self.position[0], self.position[1]]
        return out

    def describe(self) -> str:
        """Short English name of what the clause asks for, e.g. ``"2 red circle"``."""
        words = [str(self.count)] + ([self.color] if self.color else []) + [self.cls]
        return " ".join(words)


@dataclass(frozen=True)
class PromptSpec:
    """A prompt and its GenEval metadata: `tag`, `prompt`, `include` and `exclude` clauses."""

    tag: str
    prompt: str
    include: tuple[Clause, ...]
    exclude: tuple[Clause, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def to_json(self) -> dict[str, Any]:
        """GenEval's dict form, with any extra keys read from the file after the known ones."""
        out: dict[str, Any] = {"tag": self.tag, "include": [c.to_json() for c in self.include]}
        if self.exclude:
            out["exclude"] = [c.to_json() for c in self.exclude]
        out["prompt"] = self.prompt
        out.update(self.extra)
        return out

    def to_line(self) -> str:
        """One JSONL line (no newline)."""
        return json.dumps(self.to_json())

    @property
    def classes(self) -> list[str]:
        """Every class word the spec names, include clauses first."""
        return [c.cls for c in (*self.include, *self.exclude)]

    @property
    def colors(self) -> list[str]:
        """Every color word the spec names."""
        return [c.color for c in (*self.include, *self.exclude) if c.color is not None]


def parse_spec(data: Any, where: str = "<spec>") -> PromptSpec:
    """Validate a decoded JSON value as a spec; `where` (``file:line``) prefixes every error."""
    if not isinstance(data, dict):
        raise SpecError(f"{where}: expected a JSON object, got {_kind(data)}")
    for key in ("tag", "prompt", "include"):
        if key not in data:
            raise SpecError(f"{where}: missing required key {key!r}")
    tag = _string(data["tag"], where, "tag")
    prompt = _string(data["prompt"], where, "prompt")
    include = _clauses(data["include"], where, "include", allow_position=True)
    if not include:
        raise SpecError(f"{where}: include: expected at least one clause, got an empty list")
    exclude = _clauses(data.get("exclude", []), where, "exclude", allow_position=False)
    for i, clause in enumerate(include):
        if clause.position is not None and not 0 <= clause.position[1] < i:
            raise SpecError(
                f"{where}: include[{i}].position: the target index must name an earlier include "
                f"clause (0..{i - 1}), got {clause.position[1]}"
            )
    for i, wanted in enumerate(include):
        for j, banned in enumerate(exclude):
            if (
                banned.cls == wanted.cls
                and banned.color in (None, wanted.color)
                and banned.count <= wanted.count
            ):
                what = " ".join(w for w in (banned.color, banned.cls) if w)
                raise SpecError(
                    f"{where}: exclude[{j}] forbids {banned.count} or more {what}, but "
                    f"include[{i}] asks for {wanted.count}: no image can satisfy this spec"
                )
    extra = {k: v for k, v in data.items() if k not in _SPEC_KEYS}
    return PromptSpec(tag, prompt, include, exclude, extra)


def parse_line(line: str, where: str = "<spec>") -> PromptSpec:
    """Parse one JSONL line; malformed JSON or a key given twice in one object is a `SpecError`
    naming `where` (JSON parsers keep the last silently)."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise SpecError(f"{where}: key {key!r} appears twice in one object")
            seen[key] = value
        return seen

    def integer(text: str) -> int:
        if len(text.lstrip("-")) > MAX_DIGITS:
            raise SpecError(f"{where}: a number of {len(text)} digits; at most {MAX_DIGITS}")
        return int(text)

    try:
        data = json.loads(line, object_pairs_hook=unique, parse_int=integer)
    except json.JSONDecodeError as err:
        raise SpecError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise SpecError(f"{where}: JSON nested too deeply to be a prompt") from None
    return parse_spec(data, where)


#: The most digits a number in a prompt line may have (a count, say).
MAX_DIGITS = 9


def iter_specs(path: str | os.PathLike) -> Iterator[tuple[str, PromptSpec]]:
    """Yield `(file:line, spec)` for each non-blank line of a JSONL file (UTF-8; other bytes are a
    `SpecError` naming the line)."""
    path = Path(path)
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SpecError(
                    f"{where}: not UTF-8 (byte {err.object[err.start]:#04x} at column "
                    f"{err.start + 1})"
                ) from None
            if line.strip():
                yield where, parse_line(line, where)


def load_specs(path: str | os.PathLike) -> list[PromptSpec]:
    """Read every spec of a JSONL file (GenEval's `evaluation_metadata.jsonl` included)."""
    return [spec for _, spec in iter_specs(path)]


def save_specs(specs: Iterable[PromptSpec], path: str | os.PathLike) -> None:
    """Write specs as JSONL, atomically (a reader never sees a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # its own, never a user's file
    try:
        tmp.write_text("".join(s.to_line() + "\n" for s in specs), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _clauses(value: Any, where: str, name: str, allow_position: bool) -> tuple[Clause, ...]:
    if not isinstance(value, list):
        raise SpecError(f"{where}: {name}: expected a list of clauses, got {_kind(value)}")
    return tuple(
        _clause(item, where, f"{name}[{i}]", allow_position) for i, item in enumerate(value)
    )


def _clause(value: Any, where: str, name: str, allow_position: bool) -> Clause:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: {name}: expected an object, got {_kind(value)}")
    unknown = sorted(set(value) - _CLAUSE_KEYS, key=str)
    if unknown:
        raise SpecError(
            f"{where}: {name}: unknown key {unknown[0]!r}; expected {', '.join(sorted(_CLAUSE_KEYS))}"
        )
    if "class" not in value:
        raise SpecError(f"{where}: {name}: missing required key 'class'")
    cls = _string(value["class"], where, f"{name}.class")
    count = value.get("count", 1)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise SpecError(f"{where}: {name}.count: expected a positive integer, got {count!r}")
    color = value.get("color")
    if color is not None:
        color = _string(color, where, f"{name}.color")
    position = value.get("position")
    if position is not None:
        if not allow_position:
            raise SpecError(f"{where}: {name}.position: only include clauses may have a position")
        position = _position(position, where, f"{name}.position")
    return Clause(cls, count, color, position)


def _position(value: Any, where: str, name: str) -> tuple[str, int]:
    ok = (
        isinstance(value, list | tuple)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
    )
    if not ok:
        raise SpecError(f"{where}: {name}: expected [relation, index], got {value!r}")
    if value[0] not in RELATIONS:
        raise SpecError(
            f"{where}: {name}: relation {value[0]!r} is not one of {', '.join(RELATIONS)}"
        )
    return (value[0], value[1])


def _string(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SpecError(f"{where}: {name}: expected a non-empty string, got {value!r}")
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(
        type(value), type(value).__name__
    )


class VocabularyError(ValueError):
    """A spec names a class or color that ShapeWorld does not draw."""


def check_spec_vocabulary(spec: PromptSpec, where: str = "<spec>") -> None:
    """Raise `VocabularyError` naming the first class or color outside ShapeWorld's vocabulary, or
    a spec asking for more objects than ShapeWorld draws (`MAX_OBJECTS`)."""
    objects = sum(clause.count for clause in spec.include)
    if objects > MAX_OBJECTS:
        raise VocabularyError(
            f"{where}: asks for {objects} objects; ShapeWorld draws at most MAX_OBJECTS = "
            f"{MAX_OBJECTS} in one image"
        )
    for clause in (*spec.include, *spec.exclude):
        if clause.cls not in SHAPES:
            raise VocabularyError(
                f"{where}: class {clause.cls!r} is not in ShapeWorld's vocabulary "
                f"({', '.join(SHAPES)}); the ShapeWorld verifier cannot score this spec"
            )
        if clause.color is not None and clause.color not in COLORS:
            raise VocabularyError(
                f"{where}: color {clause.color!r} is not in ShapeWorld's vocabulary "
                f"({', '.join(COLORS)}); the ShapeWorld verifier cannot score this spec"
            )
