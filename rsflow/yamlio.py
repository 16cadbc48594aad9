"""YAML as rsflow reads its files (task files, monitor and finetune configs, source profiles).

``yaml.safe_load`` keeps the last of two equal keys in a mapping: a task file with ``tasks:`` twice ran
the second list only, with no word about the first. :func:`load_yaml` refuses such a file instead.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that names the same key twice; its message is one line with the key and both lines."""

    def __init__(self, key: Any, first_line: int, line: int) -> None:
        self.key = key
        where = f"line {line}" if line == first_line else f"lines {first_line} and {line}"
        super().__init__(f"key {key!r} appears twice ({where}); keep one")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose mappings refuse a key they already hold."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:  # the keys written in this mapping (a key set over a merged << one is fine)
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            if key in seen:
                raise DuplicateKeyError(key, seen[key], key_node.start_mark.line + 1)
            seen[key] = key_node.start_mark.line + 1
        except TypeError:  # an unhashable key: construct_mapping below says so
            continue
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, but a mapping with a repeated key raises :class:`DuplicateKeyError`
    (a ``yaml.YAMLError``, so callers that report bad YAML report it too), and so does a value Python will
    not build (an integer of more than 4,300 digits raised a plain ValueError, a traceback)."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe
    except ValueError as exc:
        raise yaml.YAMLError(f"a value cannot be read: {exc}") from None
