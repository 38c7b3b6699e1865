"""LayerStore: fitted layers and measured configurations in a directory, resumable.

``<dir>/<recipe name>/<layer>`` is a ``analysis.loraq.save_result`` stem (codes, scales,
factors, smoothing vector; JSON written last). ``<stem>.done.json`` is written
atomically after it and holds the key: the SHA-256 of the store's own key (the run's
settings) and the recipe's JSON. A layer is reused only when its marker exists with the
same key, so a changed recipe or setting never reuses a stale layer, and an interrupted
run (even one killed with SIGKILL) redoes only the layers that had not finished.
``save_json`` / ``load_json`` keep small JSON documents (a configuration's measured
record) under the same rule.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from numfmt.fileio import write_json_atomic

from analysis.files import read_json_or_none
from analysis.loraq.result import load_result, save_result
from analysis.recipe import Recipe

__all__ = ["LayerStore", "slug"]


def slug(s: str) -> str:
    """A file-name-safe form of a layer or configuration name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


class LayerStore:
    """Per-(recipe, layer) results in ``directory`` (see the module docstring)."""

    def __init__(self, directory, key: str = ""):
        self.dir = Path(directory)
        self.key = key

    def _key(self, recipe: Recipe) -> str:
        return hashlib.sha256((self.key + "\n" + recipe.to_json()).encode()).hexdigest()

    def stem(self, recipe: Recipe, layer: str) -> Path:
        return self.dir / slug(recipe.name) / slug(layer)

    @staticmethod
    def _marker(stem: Path) -> Path:
        return stem.with_name(stem.name + ".done.json")

    def _read(self, path: Path) -> dict | None:
        d = read_json_or_none(path)
        return d if isinstance(d, dict) else None

    def load(self, recipe: Recipe, layer: str):
        """The stored result, or None when it is missing, unfinished or of other settings."""
        stem = self.stem(recipe, layer)
        info = self._read(self._marker(stem))
        if info is None or info.get("key") != self._key(recipe):
            return None
        try:
            return load_result(stem)
        except (OSError, ValueError, KeyError):
            return None

    def save(self, recipe: Recipe, layer: str, result) -> None:
        stem = self.stem(recipe, layer)
        stem.parent.mkdir(parents=True, exist_ok=True)
        save_result(result, stem)
        write_json_atomic(self._marker(stem), {"key": self._key(recipe), "config": recipe.name,
                                               "layer": layer})

    def load_json(self, recipe: Recipe, name: str):
        d = self._read(self.dir / slug(recipe.name) / (name + ".json"))
        return None if d is None or d.get("key") != self._key(recipe) else d.get("value")

    def save_json(self, recipe: Recipe, name: str, value) -> None:
        write_json_atomic(self.dir / slug(recipe.name) / (name + ".json"),
                          {"key": self._key(recipe), "value": value})
