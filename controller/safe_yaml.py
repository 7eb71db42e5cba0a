"""A YAML loader for job specs that a hostile or broken file cannot make hang or balloon.

PyYAML's `safe_load` builds only plain types, but it still follows aliases (a 600-byte
"billion laughs" file expands to gigabytes), recurses once per nesting level (5,000 levels
is a RecursionError traceback) and silently keeps the last of two equal keys. `load_yaml`
refuses each of those before any of it is built:

- aliases (`*name`) are rejected outright: a job spec never needs them;
- nesting deeper than `MAX_DEPTH` levels, and documents over `MAX_BYTES`, are rejected;
- a key that appears twice in one mapping is rejected, naming the key and both lines;
- every error is one line of at most `MAX_MESSAGE_CHARS` characters (`YamlError`).

Numbers follow YAML 1.2 as well as 1.1: `3e-4` is a float (YAML 1.1 wants `3.0e-4` and
would hand the spec the string '3e-4', which the strict spec then refuses).
"""

from __future__ import annotations

import re

import yaml
from yaml.composer import Composer
from yaml.nodes import MappingNode

MAX_BYTES = 1 << 20  # the REST API's body limit: a spec larger than this cannot be sent
MAX_DEPTH = 64
MAX_MESSAGE_CHARS = 300


class YamlError(ValueError):
    """The document is not acceptable YAML; the message is one short line."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def one_line(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """`message` on one line, cut to `limit` characters."""
    flat = " ".join(str(message).split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def _where(node_or_mark) -> str:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return f"line {mark.line + 1} column {mark.column + 1}"


class _GuardedLoader(yaml.SafeLoader):
    """SafeLoader without aliases, with a depth limit and unique mapping keys."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise YamlError(f"aliases are not allowed (*{event.anchor} at {_where(event)})")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YamlError(f"nested deeper than {MAX_DEPTH} levels (at "
                                f"{_where(self.peek_event())})")
            return Composer.compose_node(self, parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: MappingNode, deep: bool = False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key; the base class reports it
                continue
            if first is not key_node:
                raise YamlError(f"duplicate key {str(key)[:60]!r} at {_where(key_node)} "
                                f"(first at {_where(first)})")
        return super().construct_mapping(node, deep=deep)


_GuardedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str) -> object:
    """The one document in `text` (see the module docstring for what is refused)."""
    if len(text.encode("utf-8", "replace")) > MAX_BYTES:
        raise YamlError(f"document is over {MAX_BYTES} bytes")
    try:
        return yaml.load(text, Loader=_GuardedLoader)  # noqa: S506 (a SafeLoader subclass)
    except YamlError:
        raise
    except yaml.MarkedYAMLError as exc:
        where = f" at {_where(exc.problem_mark)}" if exc.problem_mark else ""
        raise YamlError(f"{exc.problem or exc.context or 'invalid YAML'}{where}") from None
    except (yaml.YAMLError, RecursionError) as exc:
        raise YamlError(str(exc) or type(exc).__name__) from None


__all__ = ["MAX_BYTES", "MAX_DEPTH", "YamlError", "load_yaml", "one_line"]
