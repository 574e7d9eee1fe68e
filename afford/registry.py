"""Registries by name for the swappable parts (Proposer, AcceptancePolicy, SpeculativeController)."""
from __future__ import annotations


def registry() -> tuple[dict[str, type], callable]:
    """A fresh {name: class} table and the decorator that fills it (and sets cls.name)."""
    table: dict[str, type] = {}

    def register(name: str):
        def deco(cls):
            table[name] = cls
            cls.name = name
            return cls
        return deco
    return table, register
