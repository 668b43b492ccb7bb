""".env.example lists every setting with its true default, and every compose variable.

Line forms: ``# SIMMIM_NAME=default`` documents a setting, ``# NAME=default`` an optional
compose variable, ``NAME=`` (uncommented, empty) a value the compose files require.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from simmim_service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = ROOT / ".env.example"
COMPOSE_FILES = [ROOT / "docker-compose.yml", *sorted((ROOT / "docker").glob("compose.*.yml"))]

DOCUMENTED = re.compile(r"^# ([A-Z][A-Z0-9_]*)=(.*)$")
ASSIGNED = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
# ${NAME}, ${NAME:-default}, ${NAME:?message} (and the forms without the colon)
INTERPOLATED = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def documented() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if match := DOCUMENTED.match(line):
            out.setdefault(match[1], []).append(match[2])
    return out


def assigned() -> dict[str, str]:
    return {m[1]: m[2] for line in ENV_EXAMPLE.read_text().splitlines() if (m := ASSIGNED.match(line))}


def interpolated() -> dict[str, list[tuple[str, str, str]]]:
    """Variable -> [(file name, operator, default or message)] over every compose file."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for path in COMPOSE_FILES:
        for match in INTERPOLATED.finditer(path.read_text()):
            out.setdefault(match[1], []).append((path.name, match[2] or "", match[3] or ""))
    return out


def test_every_setting_is_listed_once_and_nothing_unknown() -> None:
    fields = {f"SIMMIM_{name.upper()}" for name in Settings.model_fields}
    listed = documented()
    settings_listed = {name for name in listed if name.startswith("SIMMIM_")}
    assert sorted(fields - settings_listed) == [], "settings missing from .env.example"
    assert sorted(settings_listed - fields) == [], ".env.example lists settings that do not exist"
    assert {name: values for name, values in listed.items() if len(values) > 1} == {}
    unknown_assigned = {n for n in assigned() if n.startswith("SIMMIM_")} - fields
    assert not unknown_assigned


def test_listed_values_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each value, read the way the service reads it (from the environment), gives the default."""
    for name in list(os.environ):  # the test process may carry SIMMIM_* variables of its own
        if name.startswith("SIMMIM_"):
            monkeypatch.delenv(name)
    defaults = Settings()
    listed = {name: values[0] for name, values in documented().items() if name.startswith("SIMMIM_")}
    for name, value in listed.items():
        monkeypatch.setenv(name, value)
    parsed = Settings()
    wrong = {name: (getattr(parsed, name), getattr(defaults, name))
             for name in Settings.model_fields if getattr(parsed, name) != getattr(defaults, name)}
    assert wrong == {}, "listed value != default: {name: (listed, default)}"


def test_every_compose_variable_is_listed_and_every_listed_one_is_used() -> None:
    used = interpolated()
    listed = documented() | {name: [value] for name, value in assigned().items()}
    assert sorted(set(used) - set(listed)) == [], "compose variables missing from .env.example"
    compose_only = {name for name in listed if not name.startswith("SIMMIM_")}
    assert sorted(compose_only - set(used)) == [], ".env.example lists variables no compose file uses"


def test_compose_variables_show_the_main_compose_files_default() -> None:
    listed = documented()
    for name, uses in interpolated().items():
        if name.startswith("SIMMIM_"):
            continue  # settings show the service's own default; the comment says what compose sets
        defaults = {default for file, op, default in uses if op.endswith("-") and file == "docker-compose.yml"}
        for default in defaults:
            assert listed.get(name) == [default], f"{name}: .env.example says {listed.get(name)}, compose {default}"


def test_required_values_are_left_empty_for_the_operator() -> None:
    required = {name for name, uses in interpolated().items()
                if any(op.endswith("?") for file, op, _ in uses if file == "docker-compose.yml")}
    assert required == {"SIMMIM_API_KEYS", "POSTGRES_PASSWORD", "REDIS_PASSWORD"}
    assert assigned() == dict.fromkeys(required, "")  # no secret ships in the example
