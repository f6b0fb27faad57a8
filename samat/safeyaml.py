"""The one YAML reader of samat: safe types only, bounded alias expansion, no duplicate keys.

Grids, run configs and `--attack` values are files and strings other people can write. PyYAML's
safe loader runs no code, but an alias bomb (anchors that refer to anchors, ten levels deep) of a
few hundred bytes expands to billions of values, and a duplicate key silently keeps the last
one. This reader composes the node graph first (aliases are shared nodes there, so that costs
what the text costs), counts what the document would expand to, and refuses it in one line
before anything is built.
"""

from __future__ import annotations

from typing import Any

import yaml

LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
# Values a document may expand to, aliases counted every time they are used. The paper grids
# are a few hundred; a million is beyond any sane grid and still quick to refuse.
MAX_VALUES = 1_000_000


class YAMLLimitError(yaml.YAMLError):
    """A document that is valid YAML but not acceptable: too large once expanded, a recursive
    alias, a duplicate key. Its message is one line that names the problem and the fix."""


def _line(node: yaml.Node) -> str:
    mark = node.start_mark
    return f"line {mark.line + 1}" if mark is not None else "somewhere"


def _check(root: yaml.Node, limit: int) -> None:
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise YAMLLimitError(
                f"{_line(node)}: a recursive alias; an anchor cannot contain itself"
            )
        open_.add(key)
        total = 1
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    name = (k.tag, k.value)
                    if name in seen:
                        raise YAMLLimitError(
                            f"{_line(k)}: duplicate key {k.value!r} (first at "
                            f"{_line(seen[name])}); keep one of them"
                        )
                    seen[name] = k
                total += size(k) + size(v)
                if total > limit:
                    break
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                total += size(item)
                if total > limit:
                    break
        open_.discard(key)
        if total > limit:
            raise YAMLLimitError(
                f"{_line(node)}: the document expands to more than {limit:,} values "
                "(anchors and aliases counted each time they are used); write the values out "
                "or shorten it"
            )
        sizes[key] = total
        return total

    size(root)


def load(text: str, *, limit: int = MAX_VALUES) -> Any:
    """The value of one YAML document (None for an empty one). yaml.YAMLError for bad syntax;
    YAMLLimitError (a YAMLError) for a document too large once expanded or with a duplicate key."""
    loader = LOADER(text)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check(node, limit)
            return loader.construct_document(node)
        except RecursionError:
            raise YAMLLimitError(
                "the document nests deeper than Python can read; flatten it"
            ) from None
    finally:
        loader.dispose()


def describe(error: yaml.YAMLError) -> str:
    """A one-line description of a YAML error: where, and what."""
    if isinstance(error, YAMLLimitError):
        return str(error)
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark is not None else ""
    problem = getattr(error, "problem", None) or "not valid YAML"
    return f"{where}{problem}; fix the syntax"
