"""Reading YAML that raykd is given (config files, override values): safe tags only, no duplicate keys,
and aliases that cannot expand past a bound (a "billion laughs" file is refused, not expanded)."""

from __future__ import annotations

import os

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

MAX_BYTES = 16 * 2**20  # a config file, whole
MAX_NODES = 100_000  # scalars, lists and mappings once every alias is expanded


class YamlError(ValueError):
    """The text is not YAML raykd accepts; the message says where and why."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: overriding merged keys is its point
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    repeated = key in seen
                except TypeError:  # an unhashable key: SafeLoader names it
                    break
                if repeated:
                    raise YamlError(f"line {key_node.start_mark.line + 1}: key {key!r} is repeated in one mapping "
                                    "(YAML would keep only the last one)")
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: Node) -> int:
    """Nodes of the document with every alias expanded, computed without expanding (sizes memoised per
    node); refuses an alias to a node that contains it."""
    size: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            open_.discard(key)
            kids = node.value if isinstance(node, SequenceNode) else \
                [n for kv in node.value for n in kv] if isinstance(node, MappingNode) else []
            size[key] = 1 + sum(size[id(k)] for k in kids)
            if size[key] > MAX_NODES:
                raise YamlError(f"more than {MAX_NODES:,} values once its aliases (*name) are expanded; "
                                "raykd refuses such a file rather than expand it")
            continue
        if key in size:
            continue
        if key in open_:
            raise YamlError(f"line {node.start_mark.line + 1}: an alias refers to a node that contains it")
        if isinstance(node, ScalarNode):
            size[key] = 1
            continue
        open_.add(key)
        stack.append((node, True))
        kids = node.value if isinstance(node, SequenceNode) else [n for kv in node.value for n in kv]
        stack.extend((k, False) for k in kids if id(k) not in size)
    return size[id(root)]


def load_file(path: str):
    """A YAML file, size-checked before it is read."""
    size = os.path.getsize(path)
    if size > MAX_BYTES:
        raise YamlError(f"{size:,} bytes; a raykd YAML is at most {MAX_BYTES // 2**20} MiB")
    with open(path, encoding="utf-8") as f:
        return load(f.read())


def load(text: str):
    """One YAML document as Python values (None when empty); YamlError (or yaml.YAMLError) if refused."""
    if len(text) > MAX_BYTES:
        raise YamlError(f"{len(text):,} characters; a raykd YAML is at most {MAX_BYTES // 2**20} MiB")
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()
