"""The one reader of the YAML files cxrtool is given: bounded, safe, UTF-8.

Every YAML file the package reads (bundles, radiomics parameters, training
configurations, finding descriptions, zero-shot prompts) goes through :func:`read_yaml`,
which refuses, with a one-line reason naming the file (:class:`YamlFileError`):

* a file over ``max_bytes`` (1,000,000 by default), read no further than that;
* text that is not UTF-8;
* what PyYAML's safe loader refuses (only plain mappings, lists and scalars are made);
* aliases that would repeat more than :data:`ALIAS_BUDGET` values and characters once
  expanded (the "billion laughs": ``b: &b [*a, *a, ...]``, ``c: [*b, *b, ...]``...), and
  an alias inside the value it names (a recursive document). The expansion is measured on
  the composed document, before anything is built from it, in time proportional to the
  file; a few aliases that share a block of settings are far under the budget;
* a document nested too deeply, or a value Python cannot make (an integer of more than
  4,300 digits, a date such as 2024-13-45);
* with ``unique_keys``, a key given twice in one mapping (plain YAML keeps the last).

Callers check the types of the fields they read, and wrap the error in their own type
when they have one (``BundleError``, ``ParamsError``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cxrtool.errors import brief

MAX_BYTES = 1_000_000
ALIAS_BUDGET = 100_000  # values and characters that aliases may add to a document, all told
_CAP = 1 << 62  # expanded sizes are counted up to this (a bomb's true size is astronomic)


class _Refused(Exception):
    """A reason to refuse found while building the document (the file is named after)."""


class YamlFileError(ValueError):
    """A YAML file that cannot be read; ``str()`` is ``FILE: reason``, on one line."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = Path(path)
        self.reason = " ".join(reason.split())
        super().__init__(f"{self.path}: {self.reason}")


def read_yaml(path: str | os.PathLike, *, what: str, max_bytes: int = MAX_BYTES, unique_keys: bool = False) -> Any:
    """The one YAML document of a file, as plain Python values (None when it is empty).

    Args:
        path: the file.
        what: what the file is, for messages ("bundle", "radiomics parameters"...).
        max_bytes: the largest file read.
        unique_keys: refuse a key given twice in one mapping.

    Raises:
        YamlFileError: the file cannot be read, is too large, is not UTF-8, is not valid
            YAML, or expands too far through aliases (the message says which, on one line).
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as error:
        raise YamlFileError(path, f"cannot be read ({error.strerror or error})") from None
    if len(data) > max_bytes:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = 0
        said = f"{size:,} bytes" if size > max_bytes else f"over {max_bytes:,} bytes"
        raise YamlFileError(path, f"too large for {what} ({said}; the limit is {max_bytes:,} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise YamlFileError(path, f"not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start} cannot be "
                                  f"decoded: cp1252 or Latin-1?); save {what} as UTF-8") from None
    return _parse(path, text, what=what, unique_keys=unique_keys)


def _parse(path: Path, text: str, *, what: str, unique_keys: bool) -> Any:
    import yaml

    loader = None
    try:
        loader = (_unique_key_loader() if unique_keys else yaml.SafeLoader)(text)  # checks the characters
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, path, what)
        return loader.construct_document(node)
    except YamlFileError:
        raise
    except _Refused as refused:
        raise YamlFileError(path, str(refused)) from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = error.problem or error.context or str(error).splitlines()[0]
        raise YamlFileError(path, f"not valid YAML{at} ({brief(problem, 160, quote=False)})") from None
    except yaml.reader.ReaderError as error:  # a control character (NUL...) that YAML does not allow
        character = error.character if isinstance(error.character, int) else 0
        raise YamlFileError(path, f"not valid YAML (character #x{character:04x} at character {error.position} is "
                                  "not allowed in YAML text)") from None
    except yaml.YAMLError as error:
        raise YamlFileError(path, f"not valid YAML ({brief(error, 160, quote=False)})") from None
    except RecursionError:
        raise YamlFileError(path, f"nested too deeply to be {what}") from None
    except (ValueError, OverflowError) as error:  # a value Python cannot make: int("1" * 5000), 2024-13-45
        reason = str(error).split(";")[0]  # (Python's own advice after it is not the user's)
        raise YamlFileError(path, f"not valid YAML (a value cannot be read: {brief(reason, 160, quote=False)})") from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_expansion(root, path: Path, what: str) -> None:
    """Refuse a document whose aliases, expanded, would add more than :data:`ALIAS_BUDGET`
    values and characters, or that holds an alias inside the value it names.

    A node's weight is 1, plus its text for a scalar; an alias is the node it names again.
    The walk visits each node once (their expanded sizes are kept), so a bomb costs no more
    than its file."""
    from yaml.nodes import MappingNode, ScalarNode

    expanded: dict[int, int] = {}  # id(node) -> the weight of the node with its aliases expanded
    own_total = 0  # the weight of the distinct nodes: what is written in the file
    walking: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if isinstance(node, ScalarNode):
            children: list = []
        elif isinstance(node, MappingNode):
            children = [part for pair in node.value for part in pair]
        else:
            children = list(node.value)
        if finished:
            own = 1 + (len(node.value) if isinstance(node, ScalarNode) else 0)
            own_total += own
            expanded[key] = min(_CAP, own + sum(expanded[id(child)] for child in children))
            walking.discard(key)
            continue
        if key in expanded:
            continue
        if key in walking:
            raise YamlFileError(path, f"the value at line {node.start_mark.line + 1} holds an alias of itself "
                                      f"(a recursive YAML anchor); {what} cannot be recursive")
        walking.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in reversed(children))
    if expanded[id(root)] - own_total > ALIAS_BUDGET:
        raise YamlFileError(path, f"its YAML aliases would repeat more than {ALIAS_BUDGET:,} values and characters "
                                  f"(an alias bomb?); write the repeated values out, or use fewer aliases")


def _unique_key_loader():
    """PyYAML's safe loader, refusing a key given twice (plain YAML keeps the last silently)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag in ("tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"):
                continue  # <<: *defaults (its keys may be given again: those win)
            key = loader.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the safe loader says so, below
                continue
            if first is not None:
                raise _Refused(f"{brief(key)} is given twice (lines {first} and {key_node.start_mark.line + 1}); "
                               "give each its own name")
            seen[key] = key_node.start_mark.line + 1
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


__all__ = ["ALIAS_BUDGET", "MAX_BYTES", "YamlFileError", "read_yaml"]
