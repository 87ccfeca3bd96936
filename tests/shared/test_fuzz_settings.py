"""The config loader fuzzed with malformed files and environment overrides.

Hypothesis breaks a valid settings file: its TOML syntax, the value of one
field (wrong types, out-of-range numbers, memory strings and CPU counts no
Docker takes), a required field taken away, an unknown key added, or one
ACP_FLEET_* variable with a bad value. Loading must then either succeed or
raise a ConfigError naming the field that was broken, never another
exception and never a field elsewhere; a syntax error names file and line.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tomllib
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from shared.errors import ConfigError
from shared.settings import ENV_PREFIX, FleetSettings, load_settings

NEVER_SHOWN = "token-secret-that-no-message-may-show-01"
# Every table and optional sub-table is present, so that breaking one field
# leaves the others valid and any error must come from the broken one.
BASE: dict[str, Any] = {
    "config_version": 1,
    "token_secret": NEVER_SHOWN,
    "fleet": "fuzz",
    "orgs": {
        "acme": {"key_sha256": "0" * 64, "max_sessions": 4, "sessions_per_minute": 60}
    },
    "operators": {"ops": {"key_sha256": "1" * 64}},
    "profiles": {
        "coder": {
            "image": "agent:1",
            "command": ["agent", "--acp"],
            "env": {"MODE": "ci"},
            "env_allowed": ["API_KEY"],
            "secret_files": ["API_KEY"],
            "limits": {
                "memory": "1g",
                "cpus": "0.5",
                "pids": 64,
                "cpuset": "0-1",
                "io": {"device": "/dev/sda", "read_bps": 4096},
            },
            "pool": {"size": 1},
            "network": {"mode": "egress", "allow": ["api.example.com"]},
        }
    },
    "scheduler": {"port": 8080, "workspace_upload_max": "64m"},
    "worker": {
        "node": "node-1",
        "lease_ms": 10_000,
        "heartbeat_ms": 2_000,
        "workspace_archive_max": "64m",
        "egress": {"network": "fuzz-egress", "hosts": {"pypi.org": "203.0.113.7"}},
    },
}
# The entry each table of named entries holds in BASE.
ENTRIES = {"orgs": "acme", "operators": "ops", "profiles": "coder"}
FIELD_LINE = re.compile(r"^  (\S+): ", re.MULTILINE)
EXAMPLES = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The settings models an annotation holds, directly or in a union."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if get_origin(annotation) in (Union, types.UnionType):
        return [model for arg in get_args(annotation) for model in models_in(arg)]
    return []


def field_paths(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """Every field's dotted path as the file spells it, tables included."""
    for name, info in model.model_fields.items():
        path = (*prefix, info.alias or name)
        yield path
        for inner in models_in(info.annotation):
            yield from field_paths(inner, path)
        if not prefix and name in ENTRIES:
            entry = get_args(info.annotation)[1]
            yield from field_paths(entry, (*path, ENTRIES[name]))


FIELDS = sorted(field_paths(FleetSettings))
LIMITS = ("profiles", "coder", "limits")
LIMIT_FIELDS = [
    *(path for path in FIELDS if path[:3] == LIMITS and len(path) == 4),
    ("scheduler", "workspace_upload_max"),
    ("worker", "workspace_archive_max"),
]
# Fields a single environment variable can set: none inside a named entry.
ENV_FIELDS = [path for path in FIELDS if path[0] not in ENTRIES]

toml_scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
    st.text(max_size=20),
    st.datetimes(),
    st.dates(),
    # Sizes and counts near and outside the grammar Docker accepts.
    st.from_regex(r"-?\d{1,24}(\.\d{1,4})? ?[kmgtpeKMGTPE]?i?[bB]?", fullmatch=True),
    st.sampled_from(
        ["unlimited", "0", "-1", "host", "none", "egress", "1e999999999", "NaN"]
    ),
)
# Numbers as an operator might write them, exponents and units included.
number_texts = st.from_regex(
    r"[-+]?\d{1,12}(\.\d{1,4})?([eE][-+]?\d{1,10})? ?([kmgtpKMGTP]i?[bB]?)?",
    fullmatch=True,
)
# Exponents far past what a decimal context holds (about a million).
exponent_texts = st.builds(
    "{}e{}".format,
    st.integers(min_value=1, max_value=9),
    st.sampled_from([-(10**8), -(10**6), 999_999, 10**6, 10**8])
    | st.integers(min_value=-400, max_value=400),
)
toml_keys = st.from_regex(r"[A-Za-z0-9_.-]{0,10}", fullmatch=True)
toml_values = st.recursive(
    toml_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(toml_keys, inner, max_size=3)
    ),
    max_leaves=6,
)
env_text = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"),
    max_size=30,
)


@contextmanager
def environment(overrides: dict[str, str]) -> Iterator[None]:
    """Run with only ``overrides`` among the ACP_FLEET_* variables."""
    saved = dict(os.environ)
    for name in [name for name in os.environ if name.startswith(ENV_PREFIX)]:
        del os.environ[name]
    os.environ.update(overrides)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where each example writes its settings file."""
    return tmp_path_factory.mktemp("fuzz-settings") / "fleet.toml"


def load(path: Path, env: dict[str, str] | None = None) -> str | None:
    """Load ``path``; return the ConfigError's message, or None on success."""
    with environment(env or {}):
        try:
            load_settings(path)
        except ConfigError as exc:
            message = str(exc)
            assert NEVER_SHOWN not in message
            return message
    return None


def dotted(path: tuple[str, ...]) -> str:
    """A path as TOML spells it, a key that is not bare in quotes."""
    return ".".join(
        part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part)
        for part in path
    )


def named_fields(message: str) -> list[str]:
    return FIELD_LINE.findall(message)


def on_branch(named: str, broken: str) -> bool:
    """Whether ``named`` is the broken field, a table above it or a part of it."""
    return (
        named == broken
        or broken.startswith(f"{named}.")
        or named.startswith(f"{broken}.")
    )


def assert_names(message: str | None, broken: tuple[str, ...]) -> None:
    """A refusal names the broken field, and no field off its branch."""
    if message is None:
        return
    field_path = dotted(broken)
    named = named_fields(message)
    assert named, message
    assert all(on_branch(field, field_path) for field in named), message


def with_value(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    table = data
    for part in path[:-1]:
        if not isinstance(table.get(part), dict):
            table[part] = {}
        table = table[part]
    table[path[-1]] = value
    return data


def without(path: tuple[str, ...]) -> dict[str, Any]:
    data = copy.deepcopy(BASE)
    table = data
    for part in path[:-1]:
        table = table.get(part, {})
    table.pop(path[-1], None)
    return data


class TestBaseFile:
    def test_base_file_loads(self, config_path: Path) -> None:
        """The file every example breaks is valid as it stands."""
        config_path.write_text(tomli_w.dumps(BASE))

        assert load(config_path) is None

    def test_every_field_is_fuzzed(self) -> None:
        """The catalogue reaches nested tables and named entries alike."""
        assert ("profiles", "coder", "limits", "io", "read_bps") in FIELDS
        assert ("worker", "egress", "hosts") in FIELDS
        assert ("orgs", "acme", "key_sha256") in FIELDS
        assert ("scheduler", "workspace_upload_max") in FIELDS


class TestMalformedFiles:
    @EXAMPLES
    @given(
        position=st.integers(min_value=0, max_value=10_000),
        inserted=st.binary(max_size=6)
        | st.text("[]{}=\"'.,#\\\n ab1", min_size=1, max_size=6).map(str.encode),
        cut=st.integers(min_value=0, max_value=8),
    )
    def test_syntax_errors_name_the_file_and_line(
        self, config_path: Path, position: int, inserted: bytes, cut: int
    ) -> None:
        """A file broken anywhere is a ConfigError naming the file and line
        when it is no longer TOML, and a field when it is TOML still."""
        text = tomli_w.dumps(BASE).encode()
        position %= len(text)
        broken = text[:position] + inserted + text[position + cut :]
        config_path.write_bytes(broken)

        message = load(config_path)

        try:
            tomllib.loads(broken.decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError):
            assert message is not None
            assert message.startswith(f"config file {config_path} is not valid TOML")
            assert re.search(r"\bline \d+", message), message
        else:
            assert message is None or named_fields(message), message

    @EXAMPLES
    @given(path=st.sampled_from(FIELDS), value=toml_values)
    def test_a_wrong_value_is_refused_by_its_field(
        self, config_path: Path, path: tuple[str, ...], value: Any
    ) -> None:
        """Any value in any field loads or is refused naming that field."""
        config_path.write_text(tomli_w.dumps(with_value(path, value)))

        assert_names(load(config_path), path)

    # Cheap and where the decimal arithmetic lives, so searched longer.
    @settings(EXAMPLES, max_examples=600)
    @given(
        path=st.sampled_from(LIMIT_FIELDS),
        value=number_texts | exponent_texts | st.integers() | st.floats(),
    )
    def test_a_limit_is_refused_by_its_field(
        self, config_path: Path, path: tuple[str, ...], value: Any
    ) -> None:
        """Sizes, CPU counts and pids of any magnitude load or name the field."""
        if isinstance(value, int) and not -(2**63) <= value < 2**63:
            value = str(value)  # TOML integers are 64-bit
        config_path.write_text(tomli_w.dumps(with_value(path, value)))

        assert_names(load(config_path), path)

    @EXAMPLES
    @given(path=st.sampled_from(FIELDS))
    def test_a_missing_field_is_refused_by_its_field(
        self, config_path: Path, path: tuple[str, ...]
    ) -> None:
        """Without any one field the file loads or names that field."""
        config_path.write_text(tomli_w.dumps(without(path)))

        assert_names(load(config_path), path)

    @EXAMPLES
    @given(path=st.sampled_from([(), *FIELDS]), key=toml_keys, value=toml_values)
    def test_an_unknown_key_is_refused_by_its_path(
        self, config_path: Path, path: tuple[str, ...], key: str, value: Any
    ) -> None:
        """A key added to any table is refused by its dotted path, unless the
        table is one of free names such as env or hosts."""
        data = copy.deepcopy(BASE)
        table: Any = data
        for part in path:
            table = table.get(part) if isinstance(table, dict) else None
        if not isinstance(table, dict) or key in table:
            return
        table[key] = value
        config_path.write_text(tomli_w.dumps(data))

        assert_names(load(config_path), (*path, key))


class TestEnvironmentOverrides:
    @EXAMPLES
    @given(path=st.sampled_from(ENV_FIELDS), value=env_text)
    def test_a_bad_variable_is_refused_by_its_field(
        self, config_path: Path, path: tuple[str, ...], value: str
    ) -> None:
        """ACP_FLEET_A__B set to anything loads or is refused naming a.b."""
        config_path.write_text(tomli_w.dumps(BASE))
        name = ENV_PREFIX + "__".join(path).upper()

        assert_names(load(config_path, {name: value}), path)

    def test_the_secret_from_the_environment_is_never_shown(
        self, config_path: Path
    ) -> None:
        """A refused token_secret from the environment is named, not shown."""
        config_path.write_text(tomli_w.dumps(BASE))

        message = load(config_path, {f"{ENV_PREFIX}TOKEN_SECRET": "short-secret"})

        assert message is not None
        assert "  token_secret: " in message
        assert "short-secret" not in message
