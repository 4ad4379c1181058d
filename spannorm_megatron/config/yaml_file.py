"""YAML files of flags, read strictly: a key given twice is refused, not silently overwritten.

PyYAML keeps the last of two equal keys, so `lr: 3e-4` further down a long config would quietly
undo `lr: 1e-3` above it. Every YAML file a user hands us (`--config`, the lab's grid files) is
read here.
"""

from __future__ import annotations

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A mapping names the same key twice."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _value in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(
                    f"key {key!r} appears twice (lines {seen[key] + 1} and "
                    f"{key_node.start_mark.line + 1}): keep one of them")
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(stream):
    """`yaml.safe_load`, refusing duplicate keys (`DuplicateKeyError`, a `yaml.YAMLError`)."""
    return yaml.load(stream, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
