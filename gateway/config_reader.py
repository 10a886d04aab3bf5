"""The generic half of configuration loading: YAML, ``${ENV}`` interpolation, problem collection,
and small converters. ``gateway.config`` holds the tables and the gateway's own rules.

A converter is ``(reader, value, dotted_key) -> converted value``. It raises ``Invalid(reason)``
for one problem at ``dotted_key``, or reports finer-grained problems itself (``reader.problem``)
and raises ``Invalid()``. ``Reader.read`` turns either into ``FAILED``, so reading goes on and
every problem of the file is collected.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Callable, Collection, Mapping
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from gateway.errors import Invalid
from gateway.settings import Secret

Converter = Callable[["Reader", object, str], Any]
Check = Callable[["Reader", str, dict[str, Any]], None]
E = TypeVar("E", bound=Enum)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A URL's user:password@ (any scheme): the password is shown as *** wherever a URL is printed.
_URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@'\"]*:)[^@\s/'\"]*@")


class _Failed:
    def __repr__(self) -> str:
        return "FAILED"


FAILED: Any = _Failed()  # what Reader.read returns for a value whose problems are reported


def expand(value: str, environ: Mapping[str, str]) -> tuple[str, list[str]]:
    """``value`` with ``${NAME}`` and ``${NAME:-default}`` replaced, and the names that were unset.

    ``:-`` follows the shell: the default also applies when the variable is set but empty, and
    the default may itself hold ``${...}`` (``${A:-${B}}``), expanded only when it is used.
    Text that is not a complete reference stays as written.
    """
    missing: list[str] = []
    result, _ = _expand(value, 0, environ, missing, nested=False)
    return result, missing


def _expand(text: str, start: int, environ: Mapping[str, str], missing: list[str], *, nested: bool) -> tuple[str, int]:
    """Expand ``text`` from ``start``; inside a default (``nested``) stop at its closing brace.
    Returns the expansion and the index after what was consumed."""
    out: list[str] = []
    i = start
    while i < len(text):
        if nested and text[i] == "}":
            return "".join(out), i
        if text.startswith("${", i):
            reference = _reference(text, i, environ, missing)
            if reference is not None:
                expansion, i = reference
                out.append(expansion)
                continue
        out.append(text[i])
        i += 1
    return "".join(out), i


def _reference(text: str, i: int, environ: Mapping[str, str], missing: list[str]) -> tuple[str, int] | None:
    """The expansion of the ``${...}`` at ``i`` and the index after it, or None when it is not
    a complete reference (then the text stays literal)."""
    name_match = _NAME.match(text, i + 2)
    if name_match is None:
        return None
    name, after = name_match.group(), name_match.end()
    current = environ.get(name)
    if text.startswith("}", after):
        if current is None:
            missing.append(name)
            return "", after + 1
        return current, after + 1
    if not text.startswith(":-", after):
        return None
    unset_in_default: list[str] = []
    default, end = _expand(text, after + 2, environ, unset_in_default, nested=True)
    if end >= len(text):
        return None  # no closing brace
    if current:
        return current, end + 1
    missing.extend(unset_in_default)
    return default, end + 1


def mask_passwords(text: str) -> str:
    """``text`` with the password of every URL in it shown as ``***``."""
    return _URL_PASSWORD.sub(r"\1***@", text)


class Reader:
    """Collects the problems of one file while its values are converted.

    ``environ`` None switches interpolation off (for values that do not come from the file).
    """

    def __init__(self, label: str, environ: Mapping[str, str] | None, base_dir: Path) -> None:
        self.label = label
        self.environ = environ
        self.base_dir = base_dir  # relative paths in the file are relative to it
        self.problems: list[str] = []
        self.secrets: set[str] = set()  # credential values read so far (never printed)

    def problem(self, key: str, reason: str) -> None:
        reason = mask_passwords(reason)
        self.problems.append(f"{self.label}: {key}: {reason}" if self.label else f"{key}: {reason}")

    def scrubbed_problems(self) -> list[str]:
        """The problems with every credential value read in the file shown as ``***`` (a
        value from the environment may appear under another key, e.g. a port)."""
        # Whole values of 4 characters or more: a one-letter test credential ("s") must not
        # garble every line it happens to occur in, and is no secret anyone could keep.
        secrets = sorted((value for value in self.secrets if len(value) >= 4), key=len, reverse=True)
        if not secrets:
            return list(self.problems)
        pattern = re.compile(r"(?<![\w-])(?:" + "|".join(map(re.escape, secrets)) + r")(?![\w-])")
        return [pattern.sub("***", line) for line in self.problems]

    def read(self, value: object, key: str, convert: Converter) -> Any:
        """``value`` interpolated and converted, or ``FAILED`` once its problems are reported."""
        try:
            return convert(self, self.interpolate(value, key), key)
        except Invalid as exc:
            if exc.reason is not None:
                self.problem(key, exc.reason)
            return FAILED

    def interpolate(self, value: object, key: str) -> object:
        """Strings, and lists of them, with ``${...}`` replaced; mappings are left to their readers."""
        if self.environ is None:
            return value
        if isinstance(value, list):
            items: list[object] = []
            for i, item in enumerate(value):
                items.append(self.read(item, f"{key}[{i}]", raw_value))
            if any(item is FAILED for item in items):
                raise Invalid()
            return items
        if not isinstance(value, str):
            return value
        result, missing = expand(value, self.environ)
        for name in missing:
            self.problem(key, f"environment variable {name} is not set")
        if missing:
            raise Invalid()
        return result

    def peek(self, value: object) -> str | None:
        """The interpolated string ``value`` without reporting anything; None if unusable."""
        if not isinstance(value, str):
            return None
        if self.environ is None:
            return value
        result, missing = expand(value, self.environ)
        return None if missing else result

    @staticmethod
    def unknown(name: object, known: Collection[str]) -> str:
        """The reason for an unknown key, with the likely intended key when there is one."""
        close = difflib.get_close_matches(str(name), list(known), n=1)
        if close:
            return f"unknown key (did you mean {close[0]!r}?)"
        return f"unknown key (expected one of: {', '.join(known)})"


def raw_value(r: Reader, value: object, key: str) -> object:
    """The value as it is (interpolated if a string): for parts read separately later."""
    return value


def kind(value: object) -> str:
    """How a YAML value reads to a person, for 'must be X, not Y' reasons."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return "a string" if isinstance(value, str) else type(value).__name__


def fmt_number(value: float) -> str:
    """5.0 -> '5', 0.5 -> '0.5', 1e308 -> '1e+308': numbers in messages as a person wrote them."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


# --- converters -----------------------------------------------------------------------------


def text(r: Reader, value: object, key: str) -> str:
    """A non-empty string. Numbers are refused, not converted: YAML reads +15551234567 as an int."""
    if value is None:
        raise Invalid("required")
    if not isinstance(value, str):
        raise Invalid(f"must be a string, not {kind(value)} (quote it in YAML)")
    if not value.strip():
        raise Invalid("must not be empty")
    return value


def secret(r: Reader, value: object, key: str) -> Secret:
    """A credential string, masked in reprs; null is the empty (unset) secret."""
    if value is None:
        return Secret("")
    if not isinstance(value, str):
        raise Invalid(f"must be a string, not {kind(value)} (quote it in YAML)")
    r.secrets.add(value)
    return Secret(value)


def file_path(r: Reader, value: object, key: str) -> Path:
    """An absolute path; a relative one is taken from the config file's directory, not the
    working directory, so the service reads the same files wherever it is started."""
    raw = Path(text(r, value, key)).expanduser()
    return Path(os.path.normpath(r.base_dir / raw))


def optional(convert: Converter) -> Converter:
    """``convert``, with null or an empty string (e.g. ``${X:-}``) meaning "not set" (None)."""

    def read(r: Reader, value: object, key: str) -> Any:
        return None if value is None or value == "" else convert(r, value, key)

    return read


def integer(low: int, high: int | None = None) -> Converter:
    """An int in ``[low, high]``; a string of digits counts (it may come from ``${PORT}``)."""

    def read(r: Reader, value: object, key: str) -> int:
        if isinstance(value, str):
            try:
                result = int(value.strip())
            except ValueError:
                raise Invalid(f"{value!r} is not an integer") from None
        elif isinstance(value, int) and not isinstance(value, bool):
            result = value
        else:
            raise Invalid(
                f"must be an integer, not {value!r}"
                if isinstance(value, float)
                else f"must be an integer, not {kind(value)}"
            )
        if high is not None and not low <= result <= high:
            raise Invalid(f"{result} is out of range {low}..{high}")
        if result < low:
            raise Invalid(f"{result} must be >= {low}")
        return result

    return read


def number(*, minimum: float | None = None, strict: bool = False) -> Converter:
    """A finite float, ``>= minimum`` (``> minimum`` when ``strict``); numeric strings count."""

    def read(r: Reader, value: object, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise Invalid(f"must be a number, not {kind(value)}")
        try:
            result = float(value)
        except ValueError:
            raise Invalid(f"{value!r} is not a number") from None
        except OverflowError:  # an int of hundreds of digits
            raise Invalid(f"{str(value)[:12]}... is not a finite number") from None
        if not math.isfinite(result):
            raise Invalid(f"{value!r} is not a finite number")
        if minimum is not None and (result <= minimum if strict else result < minimum):
            raise Invalid(f"{fmt_number(result)} must be {'>' if strict else '>='} {fmt_number(minimum)}")
        return result

    return read


def boolean(r: Reader, value: object, key: str) -> bool:
    """true/false, also as strings (they may come from ``${FLAG:-false}``)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise Invalid(f"must be true or false, not {value!r}")


def choice(enum: type[E]) -> Converter:
    """One of ``enum``'s values."""
    allowed = [str(member.value) for member in enum]

    def read(r: Reader, value: object, key: str) -> E:
        if isinstance(value, str) and value.strip().lower() in allowed:
            return enum(value.strip().lower())
        raise Invalid(f"{value!r} is not one of {', '.join(allowed)}")

    return read


def http_url(r: Reader, value: object, key: str) -> str:
    """An absolute http(s) URL, without its trailing slash (paths are appended to it)."""
    url = text(r, value, key).strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Invalid(f"{url!r} is not an http(s) URL")
    return url.rstrip("/")


def section(
    table: Mapping[str, Converter],
    build: Callable[..., Any],
    check: Check | None = None,
    required: Collection[str] = (),
) -> Converter:
    """A mapping read key by key through ``table`` and passed to ``build`` as keyword arguments.

    Unknown keys and missing ``required`` keys are problems; null is an empty mapping (all
    defaults). ``check`` sees the converted values (failed ones are ``FAILED``) for rules that
    span keys, and may fill in defaults that depend on other keys.
    """

    def read(r: Reader, value: object, key: str) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise Invalid(f"must be a mapping, not {kind(value)}")
        start = len(r.problems)
        values: dict[str, Any] = {}
        for name, raw in value.items():
            convert = table.get(name) if isinstance(name, str) else None
            if convert is None:
                r.problem(f"{key}.{name}", r.unknown(name, table))
            else:
                values[name] = r.read(raw, f"{key}.{name}", convert)
        for name in required:
            if name not in value:
                r.problem(f"{key}.{name}", "required")
        if check is not None:
            check(r, key, values)
        if len(r.problems) > start:
            raise Invalid()
        return build(**values)

    return read


# --- YAML -----------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses a repeated key: YAML would silently keep the last one."""


def _mapping_without_repeats(loader: _Loader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[tuple[str, str]] = set()
    for key_node, _ in node.value:
        # Merge keys (<<) legitimately repeat what they merge; only literal keys are checked.
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if (key_node.tag, key_node.value) in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add((key_node.tag, key_node.value))
    return loader.construct_mapping(node)  # flattens merges, refuses unhashable keys


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_repeats)


def _compose_without_aliases(loader: _Loader, parent: yaml.Node | None, index: object) -> yaml.Node | None:
    """Refuse every alias (``*name``, merge keys included): ten nested aliases in a few hundred
    bytes expand to billions of values (DESIGN.md "Hostile input")."""
    if loader.check_event(yaml.AliasEvent):
        event = loader.peek_event()  # type: ignore[no-untyped-call]
        raise yaml.composer.ComposerError(None, None, "YAML aliases are not allowed", event.start_mark)
    return _compose_node(loader, parent, index)  # type: ignore[arg-type]


_compose_node = yaml.composer.Composer.compose_node
_Loader.compose_node = _compose_without_aliases  # type: ignore[assignment,method-assign]


def parse_yaml(r: Reader, path: Path) -> dict[Any, Any] | None:
    """The top-level mapping of the YAML file at ``path``, or None once the problem is reported."""
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        r.problems.append(f"{r.label}: file not found")
        return None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        r.problems.append(f"{r.label}: cannot read the file: {reason}")
        return None
    try:
        top = yaml.load(content, Loader=_Loader)  # _Loader is a SafeLoader: no object tags
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        r.problem(where, f"invalid YAML: {exc.problem or exc.context}")
        return None
    except yaml.YAMLError as exc:
        r.problems.append(f"{r.label}: invalid YAML: {exc}")
        return None
    if not isinstance(top, dict):
        r.problems.append(f"{r.label}: the top level must be a mapping of sections, not {kind(top)}")
        return None
    return top
