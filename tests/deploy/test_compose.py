"""The compose files, checked by a real Compose implementation and then read as resolved.

``docker-compose config`` (Compose v1, Debian's ``docker-compose`` package) validates a file
against the Compose Specification schema it bundles and prints it resolved (variables
interpolated, anchors and merges expanded) without a Docker engine. .ci/run installs it;
in CI a missing one fails these tests instead of skipping them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from simmim_service.settings import Settings
from tests.services import unavailable

ROOT = Path(__file__).resolve().parents[2]
MAIN, WORKER_ONLY, EXPOSE = "docker-compose.yml", "docker/compose.worker-only.yml", "docker/compose.expose.yml"

SECRETS = {"SIMMIM_API_KEYS": '{"test-key": "vision"}', "POSTGRES_PASSWORD": "pgpass123", "REDIS_PASSWORD": "redispass456"}
REMOTE = {  # what an extra GPU machine's .env holds
    "SIMMIM_DATABASE_URL": "postgresql+psycopg://simmim:pgpass123@main.internal:5432/simmim",
    "SIMMIM_BROKER_URL": "redis://:redispass456@main.internal:6379/0",
    "SIMMIM_RESULT_BACKEND": "redis://:redispass456@main.internal:6379/1",
    "SIMMIM_ARTIFACT_ROOT": "s3://simmim-artifacts/prod",
}
OURS = {"api", "worker-train", "worker-embed", "flower"}
WIRED = {"database_url", "broker_url", "result_backend", "artifact_root", "work_dir", "allowed_roots"}
GPU = [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def compose(tmp_path: Path, *files: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``docker-compose -f FILE... config`` with only ``env`` (no .env file, no variables of ours)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        unavailable("docker-compose is not installed (apt-get install docker-compose)")
    assert binary is not None
    no_dotenv = tmp_path / "empty.env"
    no_dotenv.write_text("")
    cmd = [binary, "--env-file", str(no_dotenv)]
    for file in files:
        cmd += ["-f", str(ROOT / file)]
    return subprocess.run([*cmd, "config"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), **env})


def resolved(tmp_path: Path, *files: str, env: dict[str, str]) -> dict[str, Any]:
    done = compose(tmp_path, *files, env=env)
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return resolved(tmp_path_factory.mktemp("compose"), MAIN, env=SECRETS)["services"]


@pytest.fixture(scope="module")
def worker_only(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return resolved(tmp_path_factory.mktemp("compose"), WORKER_ONLY, env=REMOTE)["services"]


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Container path -> (source, mode) from v1's ``source:target:mode`` volume strings."""
    out = {}
    for volume in service.get("volumes", []):
        source, target, mode = volume.rsplit(":", 2)
        out[target] = (source, mode)
    return out


def settings_of(service: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The Settings a container of ``service`` would build from its environment (and nothing else)."""
    for name in list(os.environ):
        if name.startswith("SIMMIM_"):
            monkeypatch.delenv(name)
    for name, value in service["environment"].items():
        if value is not None:
            monkeypatch.setenv(name, str(value).replace("$$", "$"))
    return Settings()


def test_services_and_the_monitoring_profile(main: dict[str, Any]) -> None:
    assert set(main) == {"redis", "postgres", "api", "worker-train", "worker-embed", "flower"}
    assert main["flower"]["profiles"] == ["monitoring"]
    assert [name for name, s in main.items() if "profiles" in s] == ["flower"]  # the rest start by default
    assert main["api"]["command"] == ["simmim-service", "serve", "--host", "0.0.0.0", "--port", "8000"]
    assert main["worker-train"]["command"] == ["simmim-service", "worker", "--queues", "train", "--gpus", "all"]
    assert main["worker-embed"]["command"] == ["simmim-service", "worker", "--queues", "embed"]
    assert main["flower"]["command"][:4] == ["celery", "-A", "worker.app", "flower"]
    assert main["api"]["build"]["target"] == "api" and main["flower"]["build"]["target"] == "flower"
    assert {main[s]["build"]["dockerfile"] for s in ("worker-train", "worker-embed")} == {"docker/worker.Dockerfile"}


def test_every_service_has_a_healthcheck_and_waits_for_what_it_needs(main: dict[str, Any]) -> None:
    needs = {"redis": set(), "postgres": set(), "api": {"postgres", "redis"}, "flower": {"redis"},
             # the API creates the job store schema, so the workers wait for it too
             "worker-train": {"postgres", "redis", "api"}, "worker-embed": {"postgres", "redis", "api"}}
    for name, service in main.items():
        assert service["healthcheck"]["test"], name
        depends = service.get("depends_on", {})
        assert set(depends) == needs[name], name
        assert all(d == {"condition": "service_healthy"} for d in depends.values()), name
    assert "/healthz" in " ".join(main["api"]["healthcheck"]["test"])
    assert "/healthcheck" in " ".join(main["flower"]["healthcheck"]["test"])
    for worker in ("worker-train", "worker-embed"):
        assert main[worker]["healthcheck"]["test"][:4] == ["CMD", "python", "-m", "worker.healthcheck"]
    assert "ping" in " ".join(main["redis"]["healthcheck"]["test"])
    assert "pg_isready" in main["postgres"]["healthcheck"]["test"]


def test_training_workers_reserve_every_gpu_and_nothing_else_does(main: dict[str, Any]) -> None:
    assert main["worker-train"]["deploy"]["resources"]["reservations"]["devices"] == GPU
    assert [name for name, service in main.items() if "deploy" in service] == ["worker-train"]
    assert main["worker-train"]["shm_size"]  # DataLoader workers need more than Docker's 64 MB


def test_volumes_persist_the_broker_and_the_store_and_share_artifacts(main: dict[str, Any]) -> None:
    assert set(main["redis"]["command"]) >= {"--appendonly", "yes"}
    command = main["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert mounts(main["redis"])["/data"] == ("redis-data", "rw")
    assert mounts(main["postgres"])["/var/lib/postgresql/data"] == ("postgres-data", "rw")

    artifact_root = main["api"]["environment"]["SIMMIM_ARTIFACT_ROOT"]
    work = set()
    for name in ("api", "worker-train", "worker-embed"):
        service = main[name]
        assert service["environment"]["SIMMIM_ARTIFACT_ROOT"] == artifact_root
        assert mounts(service)[artifact_root] == ("artifacts", "rw"), name
        assert mounts(service)["/data"][1] == "ro", name  # datasets, read-only
        if name != "api":
            work.add(mounts(service)[service["environment"]["SIMMIM_WORK_DIR"]][0])
    assert work == {"train-work", "embed-work"}  # scratch space is not shared
    named = {source for s in main.values() for source, _ in mounts(s).values() if not source.startswith("/")}
    assert named == {"redis-data", "postgres-data", "artifacts", "train-work", "embed-work"}


def test_our_services_get_only_real_settings_and_every_required_one(main: dict[str, Any],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    fields = set(Settings.model_fields)
    for name in OURS:
        env = main[name]["environment"]
        unknown = sorted(k for k in env if not k.startswith("SIMMIM_") or k.removeprefix("SIMMIM_").lower() not in fields)
        assert not unknown, f"{name} sets variables that are no setting of ours: {unknown}"
        missing = sorted(f for f in WIRED if env.get(f"SIMMIM_{f.upper()}") is None)
        assert not missing, f"{name} leaves required settings unset: {missing}"
        settings_of(main[name], monkeypatch)  # every value parses

    api = settings_of(main["api"], monkeypatch)
    assert api.api_keys == {"test-key": "vision"} and api.auth_required
    assert "SIMMIM_API_KEYS" not in main["worker-train"]["environment"]  # workers never see API keys
    assert api.database_url == "postgresql+psycopg://simmim:pgpass123@postgres:5432/simmim"
    assert main["postgres"]["environment"] == {"POSTGRES_USER": "simmim", "POSTGRES_DB": "simmim",
                                               "POSTGRES_PASSWORD": "pgpass123"}
    assert (api.broker_url, api.result_backend) == ("redis://:redispass456@redis:6379/0",
                                                    "redis://:redispass456@redis:6379/1")
    command = main["redis"]["command"]
    assert command[command.index("--requirepass") + 1] == "redispass456"
    assert api.allowed_roots == ["/data"]


def test_every_setting_can_be_set_from_env(main: dict[str, Any]) -> None:
    """A new setting must be wired here too, or `.env` could not change it in a deployment."""
    set_elsewhere = {"host", "port",  # `serve --host/--port` on the command line
                     "worker_gpus"}  # set by `simmim-service worker` per process
    api_only = {"api_keys", "auth_required", "default_tenant"}  # workers never need API keys
    fields = set(Settings.model_fields)
    assert set_elsewhere | api_only <= fields
    reaching = {name: {k.removeprefix("SIMMIM_").lower() for k in main[name]["environment"]} for name in OURS}
    assert sorted(fields - set_elsewhere - reaching["api"]) == []
    for name in ("worker-train", "worker-embed", "flower"):
        assert sorted(fields - set_elsewhere - api_only - reaching[name]) == [], name
        assert not reaching[name] & api_only, name


def test_other_settings_pass_through_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    options = '{"endpoint_url": "http://minio:9000", "key": "k", "secret": "s"}'
    services = resolved(tmp_path, MAIN, env={**SECRETS, "SIMMIM_EMBED_CACHE_SIZE": "2", "SIMMIM_AUTH_REQUIRED": "false",
                                             "SIMMIM_ARTIFACT_ROOT": "s3://bucket/prefix",
                                             "SIMMIM_ARTIFACT_STORAGE_OPTIONS": options})["services"]
    for name in ("api", "worker-train", "worker-embed"):
        settings = settings_of(services[name], monkeypatch)
        assert settings.embed_cache_size == 2 and settings.artifact_root == "s3://bucket/prefix"
        assert settings.artifact_storage_options == {"endpoint_url": "http://minio:9000", "key": "k", "secret": "s"}
    assert settings_of(services["api"], monkeypatch).auth_required is False


@pytest.mark.parametrize("variable", sorted(SECRETS))
def test_a_missing_secret_stops_compose_with_a_clear_message(tmp_path: Path, variable: str) -> None:
    done = compose(tmp_path, MAIN, env={k: v for k, v in SECRETS.items() if k != variable})
    assert done.returncode != 0
    assert f"set {variable} in .env" in done.stderr


def test_the_main_machine_publishes_redis_and_postgres_only_with_the_expose_file(tmp_path: Path,
                                                                                main: dict[str, Any]) -> None:
    assert "ports" not in main["redis"] and "ports" not in main["postgres"]
    exposed = resolved(tmp_path, MAIN, EXPOSE, env={**SECRETS, "PUBLISH_ADDRESS": "10.0.0.5"})["services"]
    assert exposed["redis"]["ports"] == ["10.0.0.5:6379:6379/tcp"]
    assert exposed["postgres"]["ports"] == ["10.0.0.5:5432:5432/tcp"]
    assert mounts(exposed["api"]) == mounts(main["api"])  # a merge may reorder the list
    assert {**exposed["api"], "volumes": None} == {**main["api"], "volumes": None}


def test_an_extra_gpu_machine_runs_only_the_training_worker(worker_only: dict[str, Any], main: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    (name,) = worker_only
    worker = worker_only[name]
    assert name == "worker-train" and "depends_on" not in worker
    assert worker["deploy"]["resources"]["reservations"]["devices"] == GPU
    for key in ("command", "healthcheck", "shm_size", "stop_grace_period", "init"):
        assert worker[key] == main["worker-train"][key], key
    assert worker["build"]["dockerfile"] == "docker/worker.Dockerfile"
    assert Path(worker["build"]["context"]) == ROOT
    # The same settings reach it as on the main machine, the wiring from this machine's .env.
    assert set(worker["environment"]) == set(main["worker-train"]["environment"])
    settings = settings_of(worker, monkeypatch)
    assert (settings.database_url, settings.broker_url, settings.result_backend, settings.artifact_root) == (
        REMOTE["SIMMIM_DATABASE_URL"], REMOTE["SIMMIM_BROKER_URL"], REMOTE["SIMMIM_RESULT_BACKEND"],
        REMOTE["SIMMIM_ARTIFACT_ROOT"])
    assert mounts(worker)["/data"][1] == "ro" and settings.allowed_roots == ["/data"]


@pytest.mark.parametrize("variable", sorted(REMOTE))
def test_an_extra_gpu_machine_needs_all_its_wiring(tmp_path: Path, variable: str) -> None:
    done = compose(tmp_path, WORKER_ONLY, env={k: v for k, v in REMOTE.items() if k != variable})
    assert done.returncode != 0
    assert f"set {variable} in .env" in done.stderr
