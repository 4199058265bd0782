"""The plugin registry: modes and rewards by name, from this package or anyone's.

A plugin registers with a decorator in its own module and exposes that module through an entry point
of the group `avr.modes` or `avr.rewards`; `load_plugins()` imports every such entry point once.
An entry point may also name a class (`echo = avr_echo:EchoMode`) that is not decorated: it is
registered under the entry point's name. One that names anything else (a function, a module that
registers nothing, a class of the wrong kind) is an error naming the entry point and its
distribution: a plugin is never silently absent. The
built-ins (`avr.modes.*`, `avr.rewards.*`) take exactly the same path, so a user's package is a
peer, not a special case. `python -m avr.registry` lists what is registered and who provides it.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TypeVar

T = TypeVar("T", bound=type)
GROUPS: tuple[str, ...] = ("avr.modes", "avr.rewards")


class RegistryError(LookupError):
    """An unknown or duplicate plugin name."""


@dataclass(frozen=True)
class Entry:
    """One registered plugin: its name, class and the distribution (package) that provides it."""

    name: str
    cls: type
    provider: str


class Registry:
    """Name → class for one entry-point group."""

    def __init__(self, group: str, kind: str) -> None:
        self.group, self.kind = group, kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: register under `name`; a name already taken is an error."""

        def decorate(cls: T) -> T:
            existing = self._entries.get(name)
            if existing is not None and existing.cls is not cls:
                raise RegistryError(
                    f"{self.kind} {name!r} is already registered by {_path(existing.cls)}; "
                    f"{_path(cls)} cannot take the same name"
                )
            cls.name = name
            self._entries[name] = Entry(name, cls, _provider(cls))
            return cls

        return decorate

    def get(self, name: str) -> type:
        """The class registered as `name` (plugins loaded first); unknown names list the known."""
        load_plugins()
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise RegistryError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {known}")
        return self._entries[name].cls

    def names(self) -> list[str]:
        """Registered names, sorted (plugins loaded first)."""
        load_plugins()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        """Registered entries, sorted by name."""
        load_plugins()
        return [self._entries[n] for n in sorted(self._entries)]


MODES = Registry("avr.modes", "mode")
REWARDS = Registry("avr.rewards", "reward")
register_mode = MODES.register
register_reward = REWARDS.register
_loaded: set[str] = set()


def load_plugins() -> None:
    """Import every entry point of the `avr.modes` and `avr.rewards` groups (once each)."""
    for group in GROUPS:
        for ep in entry_points(group=group):
            key = f"{group}:{ep.name}={ep.value}"
            if key in _loaded:
                continue
            _register_entry_point(ep, MODES if group == MODES.group else REWARDS)
            _loaded.add(key)


def _register_entry_point(ep, registry: Registry) -> None:
    """Load `ep`: a module registers its classes itself; an undecorated class is registered under
    the entry point's name; anything else is a `RegistryError`."""
    where = (
        f"entry point {ep.name!r} = {ep.value!r} in group {registry.group} "
        f"(distribution {ep.dist.name if ep.dist is not None else 'unknown'})"
    )
    try:
        target = ep.load()
    except Exception as err:
        raise RegistryError(f"{where} does not load: {type(err).__name__}: {err}") from err
    base = _base(registry)
    if isinstance(target, type):
        if not issubclass(target, base):
            raise RegistryError(f"{where} names {_path(target)}, which is not a {_path(base)}")
        if not any(e.cls is target for e in registry._entries.values()):
            registry.register(ep.name)(target)
        return
    if isinstance(target, types.ModuleType):
        prefix = target.__name__
        if not any(
            e.cls.__module__ == prefix or e.cls.__module__.startswith(prefix + ".")
            for e in registry._entries.values()
        ):
            raise RegistryError(
                f"{where} names module {prefix}, which registers no {registry.kind} "
                f"(decorate a class with @register_{registry.kind}, or name the class: "
                f"{ep.name} = {prefix}:ClassName)"
            )
        return
    raise RegistryError(
        f"{where} names {type(target).__name__} {ep.value}; expected a {registry.kind} class "
        f"or a module that registers one"
    )


def _base(registry: Registry) -> type:
    if registry is MODES:
        from avr.protocol import Mode

        return Mode
    from torchmetrics import Metric

    return Metric


def list_modes() -> list[str]:
    """Names of every registered mode."""
    return MODES.names()


def list_rewards() -> list[str]:
    """Names of every registered reward."""
    return REWARDS.names()


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _provider(cls: type) -> str:
    from importlib.metadata import packages_distributions

    top = cls.__module__.split(".")[0]
    dists = packages_distributions().get(top, [])
    return dists[0] if dists else top


def main() -> int:
    """Print every registered mode, reward and backbone with the package that provides it, class
    paths whole (folded, never cut, on a narrow terminal)."""
    from rich.console import Console
    from rich.table import Table

    from avr.backbone.protocol import backbones

    table = Table(title="avr plugins")
    for column in ("kind", "name", "class", "provided by"):
        table.add_column(column, overflow="fold")
    for registry in (MODES, REWARDS):
        for entry in registry.entries():
            table.add_row(registry.kind, entry.name, _path(entry.cls), entry.provider)
    for kind, cls in backbones().items():
        table.add_row("backbone", kind, _path(cls), _provider(cls))
    Console().print(table)
    return 0


if __name__ == "__main__":
    # Run the imported module's `main`: plugins register into `avr.registry`, not into `__main__`.
    from avr.registry import main as _main

    sys.exit(_main())
