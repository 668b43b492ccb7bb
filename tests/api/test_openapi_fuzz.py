"""A property-based run over the whole OpenAPI document (schemathesis) against the real app.

The app is served by uvicorn on SQLite with a ``FakeDispatcher``; every operation of
``/openapi.json`` gets generated requests in three flavours:

* ``positive``: requests that match the document, with random path ids (mostly 404s);
* ``seeded``: the same, with the ids of a real succeeded job, checkpoint and embedding run,
  so the deeper code (downloads, embeddings, metrics, events) is reached;
* ``negative``: requests that break the document (wrong types, missing fields, bad enums).

Every response must be no 5xx, have a documented status code, a documented content type and
headers, and a body that matches its schema; requests that break the document must be
refused with a 4xx. Deterministic (``derandomize``) and bounded (``MAX_EXAMPLES`` per
operation and flavour): about a minute on two CPU cores.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.config import HttpBearerAuthConfig
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from jobstore import repo
from jobstore.states import JobStatus
from tests.api.conftest import ALICE, live_api, make_settings
from tests.api.fakes import FakeDispatcher
from tests.api.store import seed_checkpoint, seed_job

MAX_EXAMPLES = 50
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, ignored_auth]


def seed(live: Any) -> dict[str, str]:
    """A succeeded job with a checkpoint, metrics and a succeeded embedding run: real ids to aim at."""
    job_id = seed_job(live.sessions, status=JobStatus.SUCCEEDED)
    checkpoint_id, _ = seed_checkpoint(live.sessions, live.artifacts, job_id, size=2000)
    with live.sessions.begin() as s:
        run = repo.create_embedding_run(s, job_id=job_id, dataset="/data/x", options={})
        run_id = run.id
    key = f"jobs/{job_id}/embeddings/{run_id}"
    for name, data in (("embeddings.npy", b"\x93NUMPY fake"), ("files.txt", b"a.png\n")):
        path = live.artifacts.local_path(f"{key}/{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with live.sessions.begin() as s:
        repo.update_embedding_run(s, run_id=run_id, status="succeeded", embeddings_key=f"{key}/embeddings.npy",
                                  files_key=f"{key}/files.txt")
    return {"job_id": job_id, "checkpoint_id": checkpoint_id, "run_id": run_id}


def takes_input(operation: Any) -> bool:
    definition = operation.definition.raw
    return bool(definition.get("parameters") or definition.get("requestBody"))


def run_operation(operation: Any, mode: GenerationMode, path_parameters: dict[str, str] | None,
                  counts: Counter[str], statuses: Counter[int]) -> None:
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

    @hypothesis_settings(max_examples=MAX_EXAMPLES, derandomize=True, deadline=None, database=None,
                         phases=[Phase.explicit, Phase.generate], print_blob=True,
                         suppress_health_check=list(HealthCheck))
    @given(case=strategy)
    def check(case: Any) -> None:
        response = case.call_and_validate(checks=CHECKS, timeout=20)
        counts[f"{case.method} {case.path}"] += 1
        statuses[response.status_code] += 1

    check()


@pytest.mark.timeout(300)
def test_whole_openapi_document_holds_under_generated_requests(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               record_property: Callable[[str, Any], None]) -> None:
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path / 'jobs.db'}", rate_limit_per_minute=0,
                             max_active_jobs_per_tenant=1000)
    with live_api(settings, FakeDispatcher()) as live:
        ids = seed(live)
        schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
        rejection = schema.config.checks.negative_data_rejection  # a 413 (too many images) is a refusal too
        rejection.expected_statuses = [*rejection.expected_statuses, "413"]
        schema.config.generation.allow_extra_parameters = False  # unknown query parameters are ignored, by design
        schema.config.auth.openapi.schemes = {"HTTPBearer": HttpBearerAuthConfig(bearer=ALICE)}  # a real key
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 16
        counts: Counter[str] = Counter()
        statuses: Counter[int] = Counter()
        failures: list[str] = []
        unsatisfiable: list[str] = []
        started = time.monotonic()
        flavours: list[tuple[str, GenerationMode, Callable[[Any], dict[str, str] | None]]] = [
            ("positive", GenerationMode.POSITIVE, lambda op: None),
            ("seeded", GenerationMode.POSITIVE,
             lambda op: {p.name: ids[p.name] for p in op.path_parameters if p.name in ids} or None),
            ("negative", GenerationMode.NEGATIVE, lambda op: None),
        ]
        for flavour, mode, path_parameters in flavours:
            for operation in operations:
                fixed = path_parameters(operation)
                if flavour == "seeded" and fixed is None:
                    continue
                if flavour == "negative" and not takes_input(operation):
                    continue  # nothing to get wrong
                try:
                    run_operation(operation, mode, fixed, counts, statuses)
                except Unsatisfiable:
                    assert flavour == "negative", operation.path
                    unsatisfiable.append(f"{operation.method.upper()} {operation.path}")  # only free-form strings
                except (Exception, BaseExceptionGroup) as err:  # collect them all: one run shows all
                    failures.append(f"[{flavour}] {operation.method.upper()} {operation.path}: {err}")
        elapsed = time.monotonic() - started
    with capsys.disabled():
        print(f"\nschemathesis: {sum(counts.values())} requests over {len(operations)} operations in "
              f"{elapsed:.0f} s; statuses {dict(sorted(statuses.items()))}; no invalid input to generate for "
              f"{len(unsatisfiable)} operations")
    record_property("bad_inputs", sum(n for code, n in statuses.items() if 400 <= code < 500))  # refused requests
    assert not failures, "\n\n".join(failures)
    assert statuses[200] > 0 and not any(code >= 500 for code in statuses)
