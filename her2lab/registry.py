"""One name → entry registry behind every extension point (label schemes, encoder sources, MIL
nets, metrics).

Each extension point keeps its own public ``register_*`` / ``unregister_*`` / ``list_*``
functions and its own error class; this module holds what they share: refusing a name taken
twice, removing a name, listing the names, and the one-line error for an unknown name that lists
the registered ones and says which config key sets it::

    LOSSES = Registry("loss", key="train.loss", error=LossError)
    LOSSES.register("ce", cross_entropy)
    LOSSES.get("nope")  # LossError: train.loss='nope': use one of ce

It sits in the bottom layer and imports nothing from her2lab but :mod:`her2lab.errors`, so any
layer can keep a registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

from her2lab.errors import Her2labError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name, in registration order.

    Args:
        kind: what an entry is, for messages (``"label scheme"``, ``"MIL net"``).
        key: the config key whose value is a name here (``"labels.name"``); ``None`` where no
            single key selects an entry.
        error: the error class :meth:`get` raises for an unknown name.
        unknown: the message for an unknown name, a format string with ``{name}`` (the name
            asked for), ``{names}`` (the registered names, sorted) and ``{registered}`` (the
            same in registration order); ``None``: ``{key}={name!r}: use one of {names}``, or
            ``{kind} {name!r} is not registered; use one of {names}`` without a key.
    """

    def __init__(
        self,
        kind: str,
        *,
        key: str | None = None,
        error: type[Her2labError] = Her2labError,
        unknown: str | None = None,
    ) -> None:
        self.kind = kind
        self.key = key
        self.error = error
        if unknown is None:
            unknown = (
                f"{key}={{name!r}}: use one of {{names}}"
                if key
                else f"{kind} {{name!r}} is not registered; use one of {{names}}"
            )
        self._unknown = unknown
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, replace: bool = False) -> T:
        """Add ``entry`` as ``name``.

        Args:
            name: the name that selects the entry.
            entry: what the name stands for (a function, a class, a spec).
            replace: take the place of an entry registered under ``name`` before.

        Returns:
            ``entry``, so that a decorator can hand it back unchanged.

        Raises:
            Her2labError: ``name`` is registered already and ``replace`` is false; a base-class
                error, since it is a mistake in code, not an unknown name in a config.
        """
        if name in self._entries and not replace:
            raise Her2labError(f"{self.kind} {name!r} is registered twice; pick another name")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        """Remove ``name``; no error if it is not registered (tests remove what they added)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, sorted."""
        return sorted(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, entry)`` pairs in registration order (for tables whose column order it is)."""
        return list(self._entries.items())

    def get(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises:
            Her2labError: of the class given as ``error``: ``name`` is not registered; the
                message lists the registered names.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise self.error(
                self._unknown.format(
                    name=name, names=", ".join(self.names()), registered=", ".join(self._entries)
                )
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        """The registered names, in registration order."""
        return iter(list(self._entries))  # a copy: registering while iterating is then safe

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"
