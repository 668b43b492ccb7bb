"""The Dockerfiles, read statically (no Docker engine here): what they install, as whom, in which order.

The API image must never install torch although pyproject.toml lists it as a base dependency:
it installs docker/requirements-api.txt, then the project with --no-deps. These tests keep the
requirements files equal to pyproject.toml, so the images cannot drift from it.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
API, WORKER = ROOT / "docker" / "api.Dockerfile", ROOT / "docker" / "worker.Dockerfile"
TRAINING_STACK = frozenset({"torch", "torchvision", "timm", "safetensors"})
SOURCE = re.compile(r"^(?:\.|\./|simmim|simmim_service|api|worker|jobstore)(?:/|$)")


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Dockerfile:
    args: dict[str, str]  # ARGs declared before the first FROM, with their defaults
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def effective(self, stage: str, keyword: str) -> str | None:
        """The last ``keyword`` instruction in ``stage`` or, failing that, in the stage it is built FROM."""
        current: Stage | None = self.stage(stage)
        while current is not None:
            found = [args for kw, args in current.instructions if kw == keyword]
            if found:
                return found[-1]
            current = next((s for s in self.stages if s.name == current.base), None)
        return None

    def base_image(self, stage: str) -> str:
        base = self.stage(stage).base
        while any(s.name == base for s in self.stages):
            base = self.stage(base).base
        return re.sub(r"\$\{(\w+)\}", lambda m: self.args[m[1]], base)

    def all_instructions(self) -> list[tuple[str, str, str]]:
        """(stage, keyword, arguments) in file order."""
        return [(s.name, kw, args) for s in self.stages for kw, args in s.instructions]


def parse(path: Path) -> Dockerfile:
    logical: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, parts[0]))
        elif keyword == "ARG" and not stages:
            key, _, default = rest.partition("=")
            args[key] = default
        elif stages:
            stages[-1].instructions.append((keyword, rest.strip()))
    return Dockerfile(args, stages)


def pip_installs(dockerfile: Dockerfile) -> list[list[str]]:
    """The arguments of every ``pip install`` in RUN instructions."""
    out = []
    for _, keyword, args in dockerfile.all_instructions():
        if keyword != "RUN":
            continue
        for command in re.split(r"&&|;", args):
            words = shlex.split(command)
            for i in range(len(words) - 1):
                if Path(words[i]).name == "pip" and words[i + 1] == "install":
                    out.append(words[i + 2:])
    return out


def requirement_key(text: str) -> tuple[str, frozenset[str], str]:
    req = Requirement(text)
    return canonicalize_name(req.name), frozenset(req.extras), str(req.specifier)


def pyproject_requirements(*extras: str, drop: frozenset[str] = frozenset()) -> set[tuple[str, frozenset[str], str]]:
    """Base dependencies plus ``extras`` (self-references resolved), without the names in ``drop``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    own = canonicalize_name(project["name"])
    out: set[tuple[str, frozenset[str], str]] = set()

    def add(requirements: list[str]) -> None:
        for text in requirements:
            name, nested, spec = requirement_key(text)
            if name == own:
                for extra in nested:
                    add(project["optional-dependencies"][extra])
            elif name not in drop:
                out.add((name, nested, spec))

    add(project["dependencies"])
    for extra in extras:
        add(project["optional-dependencies"][extra])
    return out


def requirements_file(path: Path) -> set[tuple[str, frozenset[str], str]]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {requirement_key(line) for line in lines if line}


def test_requirement_files_follow_pyproject() -> None:
    api = requirements_file(ROOT / "docker" / "requirements-api.txt")
    assert api == pyproject_requirements("api", "service", "s3", drop=TRAINING_STACK)
    worker = requirements_file(ROOT / "docker" / "requirements-worker.txt")
    assert worker == pyproject_requirements("worker", "s3")
    assert {name for name, _, _ in worker} >= TRAINING_STACK | {"s3fs", "celery"}
    assert ("torch", frozenset(), "==2.14.1") in worker and ("torchvision", frozenset(), "==0.29.1") in worker


def test_the_api_image_never_installs_torch() -> None:
    dockerfile = parse(API)
    # pyproject.toml makes torch a base dependency: a plain `pip install .` would pull it in.
    assert "torch" in {name for name, _, _ in pyproject_requirements()}
    installs = pip_installs(dockerfile)
    assert installs, "no pip install found"
    for words in installs:
        if "-r" in words:
            assert words == ["-r", "/tmp/requirements-api.txt"]
        elif any("wheel" in w or w == "." for w in words):  # the project itself
            assert "--no-deps" in words, words
        else:  # explicitly named packages (flower)
            named = {canonicalize_name(Requirement(w).name) for w in words if not w.startswith("-")}
            assert named and not named & TRAINING_STACK, words
    assert ("COPY", "docker/requirements-api.txt /tmp/requirements-api.txt") in dockerfile.stage("deps").instructions
    wheel_builds = [args for _, kw, args in dockerfile.all_instructions() if kw == "RUN" and "pip wheel" in args]
    assert wheel_builds and all("--no-deps" in args for args in wheel_builds)
    names = {name for name, _, _ in requirements_file(ROOT / "docker" / "requirements-api.txt")}
    assert not names & TRAINING_STACK


@pytest.mark.parametrize(("path", "targets"), [(API, ["api", "flower"]), (WORKER, ["worker"])])
def test_images_run_as_a_non_root_user_with_a_healthcheck(path: Path, targets: list[str]) -> None:
    dockerfile = parse(path)
    assert dockerfile.stages[-1].name == targets[0]  # the default target
    for target in targets:
        user = dockerfile.effective(target, "USER")
        assert user is not None and user.split(":")[0] not in {"root", "0"}, (target, user)
        healthcheck = dockerfile.effective(target, "HEALTHCHECK")
        assert healthcheck is not None and healthcheck.upper() != "NONE", target
    assert "/healthz" in str(parse(API).effective("api", "HEALTHCHECK"))
    assert '"-m", "worker.healthcheck"' in str(parse(WORKER).effective("worker", "HEALTHCHECK"))


@pytest.mark.parametrize(("path", "requirements"), [(API, "requirements-api.txt"), (WORKER, "requirements-worker.txt")])
def test_dependencies_are_installed_before_the_source_is_copied(path: Path, requirements: str) -> None:
    """Editing the source must not invalidate the (slow) dependency layers."""
    instructions = parse(path).all_instructions()
    copies = [(i, args.split()) for i, (_, kw, args) in enumerate(instructions) if kw in ("COPY", "ADD")]
    sources = [(i, [w for w in words[:-1] if not w.startswith("--")]) for i, words in copies
               if not any(w.startswith("--from") for w in words)]
    first_source = min(i for i, paths in sources if any(SOURCE.match(p) for p in paths))
    deps = [i for i, (_, kw, args) in enumerate(instructions) if kw == "RUN" and f"-r /tmp/{requirements}" in args]
    assert deps and max(deps) < first_source
    # Before the dependencies are installed, nothing but their list enters the build.
    assert [paths for i, paths in sources if i < max(deps)] == [[f"docker/{requirements}"]]
    assert not [p for _, paths in sources for p in paths if p in (".", "./")], "never COPY the whole context"
    # Where packages and project come together, the dependency layer comes first too.
    (runtime,) = {stage for stage, kw, args in instructions if kw == "COPY" and args.startswith("--from=wheel")}
    copies_there = [args for stage, kw, args in instructions if stage == runtime and kw == "COPY"]
    assert copies_there.index("--from=deps /opt/venv /opt/venv") < copies_there.index("--from=wheel /wheels /tmp/wheels")


@pytest.mark.parametrize("path", [API, WORKER])
def test_images_copy_every_package_of_the_project(path: Path) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {d.name for d in ROOT.iterdir() if (d / "__init__.py").is_file()
                and any(fnmatch.fnmatch(d.name, pattern) for pattern in include)}
    copied = {source for kw, args in parse(path).stage("wheel").instructions if kw == "COPY"
              for source in args.split()[:-1]}
    assert copied == packages | {"pyproject.toml", "README.md"}


def test_the_worker_image_is_cuda_with_the_apis_python() -> None:
    worker, api = parse(WORKER), parse(API)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", worker.base_image("worker"))
    assert worker.base_image("deps") == worker.base_image("worker")  # built where it runs
    python = re.fullmatch(r"python:(\d+\.\d+)-slim-\w+", api.base_image("api"))
    assert python and worker.args["PYTHON_VERSION"] == python[1] == "3.11"


def test_dockerignore_keeps_secrets_and_bulk_out_but_not_what_the_images_copy() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.rstrip("/").split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        return any(fnmatch.fnmatch(p, pattern)
                   or (pattern.startswith("**/") and fnmatch.fnmatch(p.rsplit("/", 1)[-1], pattern[3:]))
                   for pattern in patterns for p in prefixes)

    for path in (".env", ".venv", ".git", "datasets", "runs", ".simmim", "worker/__pycache__"):
        assert ignored(path), path
    for dockerfile in (API, WORKER):
        for _, keyword, args in parse(dockerfile).all_instructions():
            words = args.split()
            if keyword == "COPY" and not any(w.startswith("--from") for w in words):
                for source in words[:-1]:
                    assert (ROOT / source).exists() and not ignored(source), source
