"""Components that register where they are defined: the classification heads
(:mod:`cxrtool.models.heads`, ``@register_head``) and the training loss terms
(:mod:`cxrtool.train.losses`, ``@register_loss``), in the manner of timm's
``register_model``.

A component registers its name, a one-line description and its settings: a frozen
dataclass (a subclass of :class:`ComponentSettings`) whose fields are the single place
each setting, its default and its one-line help are written::

    @dataclass(frozen=True)
    class Settings(ComponentSettings):
        r: float = setting(5.0, key="lse_r", help="sharpness of the log-sum-exp pooling")

``key`` is the flat training-configuration key the setting is read from
(``TrainConfig.lse_r``, ``--set lse_r=3``, a YAML file's ``lse_r:``);
:meth:`ComponentSettings.from_config` reads a configuration's values through it, so a
builder never writes a default a second time. Two components may read one key
(``head_dim``: the decoder heads and the apcl term): registration refuses them unless
they agree on its default and type.

Import-light (no torch): it holds how components register, none of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Generic, TypeVar, get_type_hints

_COERCIBLE = (bool, int, float, str)


def setting(default: Any, *, help: str, key: str = "", constructor: bool = True) -> Any:
    """A field of a component's settings dataclass: its default, its one-line ``help``, the
    training configuration's ``key`` it is read from (none: it keeps its default when built
    from a configuration), and whether it is one of the component's ``constructor``
    arguments (False: read from the configuration only to work out the others, as the lga
    head's ``lga_text`` decides its ``text_dim``)."""
    return field(default=default, metadata={"help": help, "key": key, "constructor": constructor})


class ComponentSettings:
    """Base of a component's settings dataclass (declare it ``@dataclass(frozen=True)``)."""

    @classmethod
    def from_config(cls, values: Mapping[str, Any]):
        """The settings a training configuration's values (``TrainConfig.to_dict()``, or any
        part of it) give: each keyed field from its key, turned into the field's type
        (``int``, ``float``, ``bool``, ``str``); the others, and keys the values lack, at
        their defaults."""
        hints = get_type_hints(cls)
        chosen = {}
        for item in fields(cls):
            key = item.metadata.get("key", "")
            if key and key in values:
                kind = hints.get(item.name)
                chosen[item.name] = kind(values[key]) if kind in _COERCIBLE else values[key]
        return cls(**chosen)

    def kwargs(self) -> dict[str, Any]:
        """The constructor's keyword arguments, in the fields' order."""
        return {item.name: getattr(self, item.name) for item in fields(self) if item.metadata.get("constructor", True)}

    @classmethod
    def keyed(cls) -> dict[str, dataclasses.Field]:
        """The configuration keys these settings read, each with its field."""
        return {item.metadata["key"]: item for item in fields(cls) if item.metadata.get("key")}

    @classmethod
    def help_by_key(cls) -> dict[str, str]:
        """Each field's one-line help, by the configuration key it is read from (or by its
        own name, for one without a key)."""
        return {item.metadata.get("key") or item.name: item.metadata.get("help", "") for item in fields(cls)}


@dataclass(frozen=True)
class NoSettings(ComponentSettings):
    """The settings of a component that has none."""


# Every configuration key some registered component reads: (default, type, who registered it first).
_KEYS: dict[str, tuple[Any, Any, str]] = {}


def register_settings(owner: str, settings: type) -> None:
    """Record the configuration keys ``settings`` reads (registering a component does
    this; call it for settings that are no component's, as the loss expression's).

    Raises:
        ValueError: not a frozen :class:`ComponentSettings` dataclass, a keyed field
            without a default, or a key another owner reads with another default or type.
    """
    if not (isinstance(settings, type) and issubclass(settings, ComponentSettings) and dataclasses.is_dataclass(settings)
            and settings.__dataclass_params__.frozen):
        raise ValueError(f"{owner}: its settings must be a frozen dataclass subclassing ComponentSettings, got {settings!r}")
    hints = get_type_hints(settings)
    claims = {}
    for key, item in settings.keyed().items():
        if item.default is dataclasses.MISSING:
            raise ValueError(f"{owner}: setting {item.name!r} (key {key!r}) has no default")
        claims[key] = (item.default, hints.get(item.name), owner)
        seen = _KEYS.get(key)
        if seen is not None and seen[2] != owner and seen[:2] != claims[key][:2]:
            raise ValueError(f"{owner} reads {key!r} as {_shown(claims[key])}, but {seen[2]} as {_shown(seen)}: components "
                             "sharing a key share its default (take it from the other's settings)")
    for key, claim in claims.items():
        if key not in _KEYS or _KEYS[key][2] == owner:
            _KEYS[key] = claim


def _shown(claim: tuple[Any, Any, str]) -> str:
    return f"{getattr(claim[1], '__name__', claim[1])} = {claim[0]!r}"


def config_keys() -> dict[str, tuple[Any, Any, str]]:
    """Every configuration key the registered components read, with its default, its type
    and the component that registered it first (a copy)."""
    return dict(_KEYS)


T = TypeVar("T")


class Registry(Generic[T]):
    """The registered components of one kind (heads, loss terms), by name, in the order
    they registered.

    ``listed`` is :mod:`cxrtool.registry`'s name -> description table of the kind, which
    the command line reads without importing torch: a registration whose name it lists
    must describe itself the same way, and one it does not list (a component of your own)
    is added to it, so the configuration's checks and the checkpoint loader accept it.
    """

    def __init__(self, kind: str, listed: dict[str, str], table: str) -> None:
        self.kind, self.listed, self.table = kind, listed, table
        self._items: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._descriptions: dict[str, str] = {}

    def add(self, name: str, description: str, settings: type, item: T, origin: str) -> None:
        """Register ``item`` (a class, or a builder) under ``name``.

        Raises:
            ValueError: no name or description, settings that are not a frozen
                :class:`ComponentSettings` dataclass or that disagree with another
                component on a shared key, a description other than the registry's, or a
                name another component (``origin``: module and qualified name) took.
        """
        if not name or not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"{origin}: a {self.kind} needs a name (a Python identifier), got {name!r}")
        if not description or not isinstance(description, str):
            raise ValueError(f"{self.kind} {name!r} ({origin}): give it a one-line description")
        if name in self._origins and self._origins[name] != origin:
            raise ValueError(f"{self.kind} {name!r} ({origin}) is already registered by {self._origins[name]}")
        if name in self.listed and self.listed[name] != description:
            raise ValueError(f"{self.kind} {name!r}: {self.table} describes it as {self.listed[name]!r} but its registration "
                             f"({origin}) as {description!r}: make them the same")
        register_settings(f"{self.kind} {name!r}", settings)
        self._items[name], self._origins[name] = item, origin
        self._descriptions[name] = description
        self.listed.setdefault(name, description)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def items(self) -> dict[str, T]:
        """Name -> registered item (a copy)."""
        return dict(self._items)

    def descriptions(self) -> dict[str, str]:
        """Name -> description of the registered components (a copy)."""
        return dict(self._descriptions)

    def check_listed(self) -> None:
        """Refuse a registry table that lists other names than those registered: called
        where the built-in components are defined, once they all have registered (before
        any component of your own can), as the table's consistency check.

        Raises:
            ImportError: naming the names registered but not listed, and the other way round.
        """
        unlisted = [name for name in self._items if name not in self.listed]
        unregistered = [name for name in self.listed if name not in self._items]
        if unlisted or unregistered:
            raise ImportError(f"{self.table} must list every built-in {self.kind} and no other: "
                              + "; ".join(part for part in (
                                  f"add {', '.join(unlisted)}" if unlisted else "",
                                  f"{', '.join(unregistered)} registered nowhere" if unregistered else "") if part))
