"""Attribute filters: `filter=brand=Arla AND (pack=1l OR pack=1.5l) AND price<20`.

Grammar (keywords AND / OR in any case; whitespace around tokens is free):

    filter     := group ( AND group )*
    group      := condition | "(" condition ( OR condition )* ")"     -- OR only within one key
    condition  := key op value
    op         := "=" | "<" | "<=" | ">" | ">="                       -- comparisons: number columns only
    key, value := a bare word (no spaces, parentheses, quotes or < = >) | a "double-quoted string" (\\" and \\\\)

Keys: `category` and the attribute columns the build indexed (app/artifacts/attributes.py: a column is a number
column when every value the build saw was a number). An item without the key matches no condition on it. A value
no item holds is not an error: it matches nothing. Errors name the 1-based character position: InvalidFilter
(syntax, a comparison on a string column, a non-number compared with a number column) and UnknownFilterKey.

A parsed filter is compiled against one engine's version (`compile_filter`): a boolean mask over the version's
item rows, built from whole memory-mapped columns, and a predicate for live delta items.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.artifacts.attributes import SKU_KEY, AttributeIndex, Column, as_number, as_text
from app.errors import InvalidFilter, UnknownFilterKey

MAX_FILTER_CHARS = 2048
MAX_CONDITIONS = 64
OPS: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
CATEGORY = "category"

_TOKEN = re.compile(
    r'\s*(?:(?P<lp>\()|(?P<rp>\))|(?P<op><=|>=|<|>|=)|"(?P<quoted>(?:[^"\\]|\\.)*)"|(?P<word>[^\s()<>="]+))'
)


@dataclass(frozen=True)
class Condition:
    key: str
    op: str
    value: str
    position: int  # of the key, 1-based
    value_position: int


@dataclass(frozen=True)
class Group:
    """Conditions on one key, any of which matches (OR)."""

    key: str
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class Filter:
    """Groups, every one of which must match (AND)."""

    text: str
    groups: tuple[Group, ...]

    @property
    def canonical(self) -> str:
        """The same filter whatever its spacing and keyword case (the engine's cache key)."""
        return " AND ".join(
            "(" + " OR ".join(f"{json.dumps(c.key)}{c.op}{json.dumps(c.value)}" for c in g.conditions) + ")"
            for g in self.groups
        )


@dataclass(frozen=True)
class _Token:
    kind: str  # lp, rp, op, word, quoted, and, or, end
    text: str
    position: int  # 1-based


def parse_filter(text: str) -> Filter:
    if len(text) > MAX_FILTER_CHARS:
        raise InvalidFilter(f"filter: longer than {MAX_FILTER_CHARS} characters")
    tokens = _tokens(text)
    parser = _Parser(tokens)
    groups = [parser.group()]
    while parser.peek().kind == "and":
        parser.take()
        groups.append(parser.group())
    end = parser.peek()
    if end.kind != "end":
        raise InvalidFilter(f"filter: expected AND or the end at character {end.position}, got {end.text!r}")
    if sum(len(g.conditions) for g in groups) > MAX_CONDITIONS:
        raise InvalidFilter(f"filter: more than {MAX_CONDITIONS} conditions")
    return Filter(text, tuple(groups))


def _tokens(text: str) -> list[_Token]:
    out: list[_Token] = []
    pos = 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            at = pos + len(text[pos:]) - len(text[pos:].lstrip()) + 1
            raise InvalidFilter(f"filter: unexpected character {text[at - 1]!r} at character {at}")
        kind = m.lastgroup or "word"
        start = m.start(kind) + 1
        value = m.group(kind)
        if kind == "quoted":
            value = re.sub(r"\\(.)", r"\1", value)
        elif kind == "word" and value.upper() in ("AND", "OR"):
            kind = value.lower()
        out.append(_Token(kind, value, start if kind != "quoted" else start - 1))
        pos = m.end()
    out.append(_Token("end", "", len(text) + 1))
    return out


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.i = 0

    def peek(self) -> _Token:
        return self.tokens[self.i]

    def take(self) -> _Token:
        tok = self.tokens[self.i]
        self.i = min(self.i + 1, len(self.tokens) - 1)
        return tok

    def group(self) -> Group:
        if self.peek().kind != "lp":
            c = self.condition()
            return Group(c.key, (c,))
        self.take()
        conditions = [self.condition()]
        while self.peek().kind == "or":
            self.take()
            c = self.condition()
            if c.key != conditions[0].key:
                raise InvalidFilter(
                    f"filter: OR joins conditions on one key; {c.key!r} at character {c.position} differs from "
                    f"{conditions[0].key!r} (join different keys with AND)"
                )
            conditions.append(c)
        close = self.take()
        if close.kind != "rp":
            raise InvalidFilter(f"filter: expected OR or ')' at character {close.position}, got {_shown(close)}")
        return Group(conditions[0].key, tuple(conditions))

    def condition(self) -> Condition:
        key = self.take()
        if key.kind not in ("word", "quoted"):
            raise InvalidFilter(f"filter: expected a key at character {key.position}, got {_shown(key)}")
        op = self.take()
        if op.kind != "op":
            raise InvalidFilter(f"filter: expected = < <= > >= at character {op.position}, got {_shown(op)}")
        value = self.take()
        if value.kind not in ("word", "quoted"):
            raise InvalidFilter(f"filter: expected a value at character {value.position}, got {_shown(value)}")
        return Condition(key.text, op.text, value.text, key.position, value.position)


def _shown(tok: _Token) -> str:
    return "the end" if tok.kind == "end" else repr(tok.text)


@dataclass(frozen=True)
class CompiledFilter:
    """One filter against one version: `mask[row]` for the version's rows; `matches(item)` for live items."""

    filter: Filter
    mask: np.ndarray  # bool, one per item row
    predicates: tuple[tuple[Callable[[dict[str, Any]], bool], ...], ...]
    matching: int  # rows the mask keeps
    per_shard: tuple[int, ...]  # of them, in each category's rows (the `offsets` compiled against)

    def matches(self, item: dict[str, Any]) -> bool:
        return all(any(p(item) for p in group) for group in self.predicates)

    @property
    def text(self) -> str:
        return self.filter.text


def compile_filter(
    parsed: Filter, attributes: AttributeIndex, categories: Sequence[str], offsets: Sequence[tuple[int, int]]
) -> CompiledFilter:
    """`categories[i]` holds rows offsets[i][0] .. offsets[i][0] + offsets[i][1]. Keys are checked before any
    mask is built: a bad filter costs its parse only."""
    for group in parsed.groups:
        if group.key != CATEGORY and group.key not in attributes.columns:
            c = group.conditions[0]
            known = ", ".join(sorted([CATEGORY, *attributes.columns])[:20])
            raise UnknownFilterKey(f"filter: unknown key {c.key!r} at character {c.position}; keys: {known}")
    mask = np.ones(attributes.n_rows, dtype=bool)
    predicates = []
    for group in parsed.groups:
        if group.key == CATEGORY:
            gmask, preds = _category_group(group, categories, offsets, attributes.n_rows)
        else:
            gmask, preds = _column_group(group, attributes.columns[group.key])
        mask &= gmask
        predicates.append(tuple(preds))
    per_shard = tuple(int(np.count_nonzero(mask[start : start + n])) for start, n in offsets)
    return CompiledFilter(parsed, mask, tuple(predicates), int(np.count_nonzero(mask)), per_shard)


def _category_group(
    group: Group, categories: Sequence[str], offsets: Sequence[tuple[int, int]], n_rows: int
) -> tuple[np.ndarray, list[Callable[[dict[str, Any]], bool]]]:
    mask = np.zeros(n_rows, dtype=bool)
    index = {name: i for i, name in enumerate(categories)}
    preds: list[Callable[[dict[str, Any]], bool]] = []
    for c in group.conditions:
        if c.op != "=":
            raise InvalidFilter(f"filter: category takes '=' only (character {c.position})")
        i = index.get(c.value)
        if i is not None:
            start, n = offsets[i]
            mask[start : start + n] = True
        preds.append(_in_category(c.value))
    return mask, preds


def _column_group(group: Group, column: Column) -> tuple[np.ndarray, list[Callable[[dict[str, Any]], bool]]]:
    mask = np.zeros(len(column.data), dtype=bool)
    preds: list[Callable[[dict[str, Any]], bool]] = []
    key = column.key
    for c in group.conditions:
        if column.kind == "number":
            number = as_number(c.value)
            if number is None:
                raise InvalidFilter(
                    f"filter: {key!r} holds numbers; {c.value!r} at character {c.value_position} is not one"
                )
            op = OPS[c.op]
            mask |= op(column.data, number)  # NaN (no value) compares false
            preds.append(_compares(key, op, number))
        else:
            if c.op != "=":
                raise InvalidFilter(
                    f"filter: {key!r} holds text: '{c.op}' at character {c.position} needs a number column"
                )
            code = column.code(c.value)
            if code >= 0:
                mask |= column.data == code
            preds.append(_equals_text(key, c.value))
    return mask, preds


Predicate = Callable[[dict[str, Any]], bool]


def _in_category(name: str) -> Predicate:
    return lambda item: item.get(CATEGORY) == name


def _compares(key: str, op: Callable[[Any, Any], Any], number: float) -> Predicate:
    def predicate(item: dict[str, Any]) -> bool:
        x = as_number(_attr(item, key))
        return x is not None and bool(op(x, number))

    return predicate


def _equals_text(key: str, text: str) -> Predicate:
    def predicate(item: dict[str, Any]) -> bool:
        x = _attr(item, key)
        return x is not None and as_text(x) == text

    return predicate


def _attr(item: dict[str, Any], key: str) -> Any:
    if key == SKU_KEY:
        return item.get("sku")  # the build's SKU column: a live item's SKU is the item's own
    attrs = item.get("attributes") or {}
    value = attrs.get(key)
    return None if value == "" else value
