"""A minimal stand-in for ml_collections' ConfigDict and FrozenConfigDict.

Used only where ml_collections is not installed: the GPU image has jax, flax, optax and orbax
but no ml_collections, and benchmarks/accelerator_check.py must build the model and its train
step there (config.py and model.py fall back to this module). It covers what building a model
and a train step reads: attribute and item access, `in`, get, to_dict, and a hashable frozen
form (the model's config is part of its graphdef, a static jit argument), and lock/unlock
(configs/base.py locks its defaults). Entry points that parse `--config` flags still need the
real ml_collections.
"""

from typing import Any, Iterator


class _Fields:
    """Read access shared by both classes: `cfg.key`, `cfg["key"]`, `key in cfg`, get."""

    def __init__(self, initial=None):
        object.__setattr__(self, "_fields", {})
        items = initial.items() if initial is not None else ()
        for key, value in items:
            self._fields[key] = self._convert(value)

    def _convert(self, value):
        return value

    def __getattr__(self, key: str):
        try:
            return self._fields[key]
        except KeyError:
            raise AttributeError(key) from None

    def __getitem__(self, key: str):
        return self._fields[key]

    def __contains__(self, key) -> bool:
        return key in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def keys(self):
        return self._fields.keys()

    def items(self):
        return self._fields.items()

    def values(self):
        return self._fields.values()

    def get(self, key: str, default=None):
        return self._fields.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return {k: v.to_dict() if isinstance(v, _Fields) else v for k, v in self._fields.items()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.to_dict()!r})"


class ConfigDict(_Fields):
    """Mutable: `cfg.section = ConfigDict()`, `cfg.section.key = value`; dicts nest. Once
    locked (configs/base.py locks the defaults) a key that does not exist cannot be added."""

    _locked = False

    def _convert(self, value):
        return ConfigDict(value) if isinstance(value, (dict, _Fields)) else value

    def __setattr__(self, key: str, value) -> None:
        if self._locked and key not in self._fields:
            raise AttributeError(f'Key "{key}" does not exist and cannot be added since the '
                                 "config is locked.")
        self._fields[key] = self._convert(value)

    __setitem__ = __setattr__

    def _set_lock(self, locked: bool) -> "ConfigDict":
        object.__setattr__(self, "_locked", locked)
        for value in self._fields.values():
            if isinstance(value, ConfigDict):
                value._set_lock(locked)
        return self

    def lock(self) -> "ConfigDict":
        return self._set_lock(True)

    def unlock(self) -> "ConfigDict":
        return self._set_lock(False)

    @property
    def is_locked(self) -> bool:
        return self._locked

    def __eq__(self, other) -> bool:
        return isinstance(other, _Fields) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, as ml_collections' ConfigDict


class FrozenConfigDict(_Fields):
    """Immutable and hashable; lists become tuples, as in ml_collections."""

    def _convert(self, value):
        if isinstance(value, (dict, _Fields)):
            return FrozenConfigDict(value)
        if isinstance(value, list):
            return tuple(value)
        return value

    def __setattr__(self, key: str, value) -> None:
        raise AttributeError(f"FrozenConfigDict is immutable (setting {key!r})")

    __setitem__ = __setattr__

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._fields.items())))

    def __eq__(self, other) -> bool:
        return isinstance(other, _Fields) and self.to_dict() == other.to_dict()

    def as_configdict(self) -> ConfigDict:
        return ConfigDict(self)
