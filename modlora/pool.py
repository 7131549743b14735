"""A directory of per-language adapters: ``root/{language}/{in|out}/`` each a PEFT adapter directory."""

from __future__ import annotations

from pathlib import Path

from . import validate
from .adapters.format import CONFIG_FILE, ROLES, SIDECAR_FILE, AdapterError, LoraAdapter
from .model import Qwen2ForCausalLM


class AdapterPool:
    """Adapters keyed by (language, role); each is loaded once and shared (e.g. by all 20 directions)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._loaded: dict[tuple[str, str], LoraAdapter] = {}

    def path(self, language: str, role: str) -> Path:
        if role not in ROLES:
            raise AdapterError(f"role must be one of {ROLES}, got {role!r}")
        return self.root / validate.plain_name(language, "an adapter language") / role

    def entries(self) -> list[tuple[str, str]]:
        """Every (language, role) present, sorted; a folder whose name is no language code (a backup
        such as ``fr.old``) holds none."""
        if not self.root.is_dir():
            return []
        return sorted((d.parent.name, d.name) for d in self.root.glob("*/*") if d.name in ROLES
                      and validate.is_plain_name(d.parent.name) and (d / CONFIG_FILE).is_file())

    def languages(self) -> list[str]:
        return sorted({lang for lang, _ in self.entries()})

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self.entries()

    def get(self, language: str, role: str) -> LoraAdapter:
        """The adapter ``role[language]``, loaded once and shared.

        Raises:
            AdapterError: no such pool, language or role (naming what exists), or an unreadable adapter.
        """
        key = (language, role)
        if key not in self._loaded:
            path = self.path(language, role)
            known = self.languages()
            if not self.root.is_dir():
                raise AdapterError(f"adapter pool {self.root} does not exist")
            if language not in known:
                raise AdapterError(f"unknown language {language!r} in adapter pool {self.root}: "
                                   f"it has {known or 'no adapters'}")
            if key not in self:
                raise AdapterError(f"adapter pool {self.root} has no {role!r} adapter for {language!r}")
            if not path.resolve().is_relative_to(self.root.resolve()):  # a link out of the pool
                raise AdapterError(f"adapter {path} resolves to {path.resolve()}, outside the pool {self.root}")
            adapter = LoraAdapter.load(path)
            if (adapter.language or language, adapter.role or role) != key:  # a copy in the wrong folder
                raise AdapterError(f"{path} holds {adapter.label} (its {SIDECAR_FILE}), not {role}[{language}]")
            adapter.language, adapter.role = language, role
            self._loaded[key] = adapter
        return self._loaded[key]

    def save(self, adapter: LoraAdapter) -> Path:
        """Write ``adapter`` to ``root/{language}/{role}/``."""
        if adapter.language is None or adapter.role is None:
            raise AdapterError(f"only adapters with a language and a role go into a pool, got {adapter.label}")
        path = adapter.save(self.path(adapter.language, adapter.role))
        self._loaded[(adapter.language, adapter.role)] = adapter
        return path

    def check(self, model: Qwen2ForCausalLM) -> None:
        """Raise one :class:`AdapterError` listing every adapter that does not fit ``model``."""
        problems = []
        for language, role in self.entries():
            try:
                self.get(language, role).check(model)
            except ValueError as e:  # AdapterError, or a file's field out of range (validate.InputError)
                problems.append(f"{role}[{language}]: {e}")
        if problems:
            raise AdapterError(f"adapter pool {self.root} does not fit the model: " + "; ".join(problems))

    def listing(self) -> str:
        """One line per adapter: language, role, rank, alpha, parameters."""
        lines = []
        for language, role in self.entries():
            a = self.get(language, role)
            lines.append(f"{language:8} {role:4} r={a.rank:<4} alpha={a.alpha:g} params={a.num_parameters():,}")
        return "\n".join(lines)
