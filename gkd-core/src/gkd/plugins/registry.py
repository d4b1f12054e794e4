"""The method registry: what ``gkd_register_methods`` fills, and the broken-plugin records."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from dataclasses import dataclass

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

from gkd.methods.spec import METHOD_KINDS, STAGE_KINDS, MethodSpec
from gkd.plugins.errors import MethodLoadError, MethodNotFound

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]*$")


@dataclass(frozen=True)
class Origin:
    """Where a method came from: entry point, distribution and version."""

    entry_point: str
    distribution: str
    version: str


@dataclass(frozen=True)
class RegisteredMethod:
    spec: MethodSpec
    origin: Origin


@dataclass(frozen=True)
class BrokenMethod:
    """A plugin that could not be loaded, or a method it could not register."""

    name: str
    origin: Origin
    reason: str
    status: str = "error"
    """``"error"`` (failed to load or register) or ``"disabled"`` (by an environment variable)."""


@dataclass(frozen=True)
class PluginCommands:
    """What one plugin's ``gkd_register_commands`` added, or why it added nothing."""

    origin: Origin
    commands: tuple[str, ...]
    reason: str = ""
    status: str = "ok"
    """``"ok"``, or ``"error"`` when the hook raised or a command took a name already in use."""


class InvalidMethodSpec(ValueError):
    """Raised by :class:`MethodRegistrar` when a spec cannot be accepted."""


def check_spec(spec: MethodSpec) -> None:
    """Validate a spec's own fields and its JSON Schema (Draft 2020-12)."""
    if not isinstance(spec, MethodSpec):
        raise InvalidMethodSpec(f"register() expects a gkd.MethodSpec, got {type(spec).__name__}")
    if not _NAME_RE.match(spec.name):
        raise InvalidMethodSpec(f"invalid method name {spec.name!r}: use lower-case letters, digits, '-' and '_'")
    if spec.kind not in METHOD_KINDS:
        raise InvalidMethodSpec(f"method {spec.name!r}: kind {spec.kind!r} is not one of {list(METHOD_KINDS)}")
    bad = [s for s in spec.stages if s not in STAGE_KINDS]
    if not spec.stages or bad:
        raise InvalidMethodSpec(f"method {spec.name!r}: stages {list(spec.stages)} must be a non-empty subset of {list(STAGE_KINDS)}")
    try:
        Draft202012Validator.check_schema(dict(spec.config_schema))
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise InvalidMethodSpec(f"method {spec.name!r} declares an invalid config schema at {where}: {exc.message}") from None
    if spec.config_schema.get("type", "object") != "object":
        raise InvalidMethodSpec(f"method {spec.name!r}: config schema must describe an object")
    from gkd.methods.checks import validate_feature_patterns  # imports torch: only with a method to check

    problems = validate_feature_patterns(spec.features)
    if problems:
        raise InvalidMethodSpec(f"method {spec.name!r}: " + "; ".join(problems))


class MethodRegistrar:
    """The ``register`` callable passed to one plugin's ``gkd_register_methods``.

    It collects the plugin's specs; nothing reaches the registry until the whole hook call
    succeeded, so a plugin that fails half-way leaves no partial registrations behind.
    """

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.specs: list[MethodSpec] = []

    def __call__(self, spec: MethodSpec) -> None:
        check_spec(spec)
        if any(s.name == spec.name for s in self.specs):
            raise InvalidMethodSpec(f"method {spec.name!r} registered twice by the same plugin")
        self.specs.append(spec)


class MethodRegistry:
    """All methods known to this process, plus the broken ones."""

    def __init__(self) -> None:
        self._methods: dict[str, RegisteredMethod] = {}
        self._broken: dict[str, BrokenMethod] = {}

    def check_free(self, name: str, origin: Origin) -> None:
        """Raise when ``name`` is already owned; the message names both distributions."""
        if name in self._methods:
            other = self._methods[name].origin
            raise InvalidMethodSpec(
                f"method name {name!r} is already registered by {other.distribution} {other.version}"
                f" (entry point {other.entry_point!r}); {origin.distribution} {origin.version} cannot register it again"
            )

    def add(self, spec: MethodSpec, origin: Origin) -> None:
        """Add a checked spec; a name already owned by another distribution is rejected."""
        self.check_free(spec.name, origin)
        self._methods[spec.name] = RegisteredMethod(spec, origin)

    def mark_broken(self, name: str, origin: Origin, reason: str, status: str = "error") -> None:
        self._broken.setdefault(name, BrokenMethod(name, origin, reason, status))

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[RegisteredMethod]:
        return iter(sorted(self._methods.values(), key=lambda m: m.spec.name))

    def __len__(self) -> int:
        return len(self._methods)

    @property
    def broken(self) -> list[BrokenMethod]:
        return sorted(self._broken.values(), key=lambda b: b.name)

    def names(self) -> list[str]:
        return sorted(self._methods)

    def get(self, name: str) -> RegisteredMethod:
        """Return a method, or raise :class:`MethodLoadError` / :class:`MethodNotFound`."""
        if name in self._methods:
            return self._methods[name]
        if name in self._broken:
            b = self._broken[name]
            raise MethodLoadError(name, b.origin.distribution, b.origin.version, b.reason)
        raise MethodNotFound(name, self.names(), self.suggest(name))

    def suggest(self, name: str) -> str | None:
        match = difflib.get_close_matches(name, self.names() + list(self._broken), n=1, cutoff=0.6)
        return match[0] if match else None
