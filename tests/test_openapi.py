"""GET /openapi.json: a valid OpenAPI 3.0 document, in sync with CONTRACT.md, and true of the live API.

(a) The document served by a live in-process worker (FakeNpuPipeline on 127.0.0.1:<free port>) is
    checked with openapi-spec-validator and against CONTRACT.md's tables: endpoint index, request
    fields and limits, status codes, error types, result and health fields.
(b) schemathesis generates requests from that document (positive and, for the job endpoints,
    negative data; derandomized, bounded) and checks every response: no 5xx (the one documented
    exception: 504 ``timeout`` for a ``timeout_s`` below 10 ms), status code, content type and
    response schema conformance.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import OpenAPIV30SpecValidator
from openapi_spec_validator import validate as validate_spec
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import content_type_conformance
from schemathesis.specs.openapi.checks import response_schema_conformance
from schemathesis.specs.openapi.checks import status_code_conformance

import worker
from conftest import REPO
from conftest import FakeNpuPipeline
from conftest import call
from conftest import cpu_settings
from conftest import serve_in_thread

CONTRACT = (REPO / "CONTRACT.md").read_text(encoding="utf-8")
JOB_PATHS = ("/v1/worker/generate", "/v1/worker/extract-memory-candidates", "/v1/worker/condense-notification")
TOKEN = "openapi-test-token-42"


# --- CONTRACT.md -----------------------------------------------------------------------------------


def section(heading: str) -> str:
    """The text under a heading of CONTRACT.md, up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = CONTRACT.index(f"\n{heading}\n") + len(heading) + 2
    following = re.search(rf"(?m)^#{{1,{level}}} ", CONTRACT[start:])
    return CONTRACT[start : start + following.start()] if following else CONTRACT[start:]


def table(text: str) -> list[list[str]]:
    """Body rows of the first Markdown table in ``text``, cells stripped."""
    rows = []
    for line in text[text.index("\n|") + 1 :].splitlines():
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not set("".join(cells)) <= set("- :"):
            rows.append(cells)
    return rows[1:]  # without the header row


def code(cell: str) -> str:
    match = re.fullmatch(r"`([^`]+)`", cell)
    assert match, cell
    return match.group(1)


def contract_endpoints() -> set[tuple[str, str]]:
    return {tuple(code(row[0]).split(" ", 1)) for row in table(section("## Endpoints"))}  # type: ignore[misc]


def contract_error_statuses() -> dict[str, int | None]:
    return {code(row[0]): int(row[1]) if row[1] else None for row in table(section("## Errors").split("```", 2)[2])}


def contract_job_endpoint_statuses() -> set[int]:
    paragraph = re.search(r"(?ms)^Status codes: (.*?)\n\n", section("### POST /v1/worker/generate"))
    assert paragraph
    return {int(number) for number in re.findall(r"\b\d{3}\b", paragraph.group(1))}


# --- a live worker ---------------------------------------------------------------------------------


def start(settings: worker.Settings) -> worker.WorkerHTTPServer:
    return serve_in_thread(settings, lambda _settings: FakeNpuPipeline(settings))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[worker.WorkerHTTPServer]:
    server = start(cpu_settings(tmp_path_factory.mktemp("openapi"), port=0))
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def document(live: worker.WorkerHTTPServer) -> dict[str, Any]:
    status, _, body = call(live, "GET", "/openapi.json")
    assert status == 200
    return body


def request_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    return document["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        schema = document["components"]["schemas"][name]
    return schema


# --- (a) the document ------------------------------------------------------------------------------


def test_the_served_document_is_valid_openapi_3_0(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.0.")
    validate_spec(document, cls=OpenAPIV30SpecValidator)
    broken = copy.deepcopy(document)  # the validator does reject a broken document
    del broken["paths"]["/livez"]["get"]["responses"]
    with pytest.raises(Exception, match="responses"):
        validate_spec(broken, cls=OpenAPIV30SpecValidator)


def test_the_document_is_also_valid_with_a_token_and_marks_the_bearer_scheme(tmp_path: Path) -> None:
    server = start(cpu_settings(tmp_path, port=0, token=TOKEN))
    try:
        assert call(server, "GET", "/openapi.json")[0] == 401
        status, _, document = call(server, "GET", "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"})
    finally:
        server.shutdown()
        server.server_close()
    assert status == 200
    validate_spec(document, cls=OpenAPIV30SpecValidator)
    assert document["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert document["security"] == [{"bearer": []}]


def test_paths_and_methods_are_the_contracts_endpoint_index(document: dict[str, Any]) -> None:
    expected = contract_endpoints()
    assert len(expected) == 8  # the table was found and read
    served = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    assert served == expected


def job_branches(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """/v1/worker/generate takes one of four bodies, one per job (each has its own token maximum)."""
    branches = request_schema(document, "/v1/worker/generate")["oneOf"]
    return {branch["properties"]["job"]["enum"][0]: branch for branch in branches}


def test_the_generate_request_schema_is_the_contracts_field_table(document: dict[str, Any]) -> None:
    rows = {code(row[0]): row for row in table(section("### POST /v1/worker/generate"))}
    branches = job_branches(document)
    # job: the four jobs, in the contract's words and in worker.JOBS
    assert list(branches) == re.findall(r"`(\w+)`", rows["job"][4]) == list(worker.JOBS)
    types = {"string": "string", "int": "integer", "number": "number", "bool": "boolean"}
    for job, schema in branches.items():
        assert set(schema["properties"]) == set(rows)
        assert sorted(schema["required"]) == sorted(name for name, row in rows.items() if row[2] == "yes")
        assert schema["additionalProperties"] is False
        properties = schema["properties"]
        assert {name: properties[name]["type"] for name in rows} == {name: types[row[1]] for name, row in rows.items()}
        assert properties["job"]["enum"] == [job]
        # input: 1 .. 6000 chars (the field table and the Limits table)
        assert (properties["input"]["minLength"], properties["input"]["maxLength"]) == (1, 6000)
        # max_new_tokens: 1 .. the job's maximum (CONTRACT.md, Jobs), never above 256
        maximum = worker.job_token_limits(worker.JOBS[job], worker.Limits())[1]
        assert (properties["max_new_tokens"]["minimum"], properties["max_new_tokens"]["maximum"]) == (1, maximum)
        assert f"| `{job}` | {worker.JOBS[job].default_max_new_tokens} / {maximum} |" in section("## Jobs")
        # timeout_s: above 0, at most --request-timeout-s (120)
        timeout = properties["timeout_s"]
        assert (timeout["minimum"], timeout["exclusiveMinimum"], timeout["maximum"]) == (0, True, 120.0)
    assert "1 .. 6000 chars" in rows["input"][4]
    assert re.search(r"(?m)^\| input length[^|]*\| 6000 chars \|", section("### Limits"))
    assert "never above 256" in section("### Limits")
    assert max(branch["properties"]["max_new_tokens"]["maximum"] for branch in branches.values()) == 256
    assert "above 0, at most `--request-timeout-s`" in rows["timeout_s"][4] and "(120)" in rows["timeout_s"][3]


def test_the_fixed_job_endpoints_take_the_same_fields_without_job(document: dict[str, Any]) -> None:
    branches = job_branches(document)
    for path in JOB_PATHS[1:]:
        branch = branches[worker.JOB_ENDPOINTS[path]]
        schema = request_schema(document, path)
        assert schema["properties"] == {name: value for name, value in branch["properties"].items() if name != "job"}
        assert schema["required"] == ["input"] and schema["additionalProperties"] is False
        assert document["paths"][path]["post"]["requestBody"]["required"] is True


def test_the_documented_limits_follow_the_settings() -> None:
    limits = worker.Limits(max_input_chars=100, max_new_tokens=32, request_timeout_s=7.5)
    document = worker.openapi_document(worker.Settings(model_path=Path("/m"), limits=limits))
    properties = job_branches(document)["summary"]["properties"]
    assert properties["input"]["maxLength"] == 100
    assert properties["max_new_tokens"]["maximum"] == 32
    assert properties["timeout_s"]["maximum"] == 7.5


# The errors the handler itself can raise while serving a POST to a job endpoint (CONTRACT.md's
# Errors table minus those of other paths or methods, of http.server's own parser, and the
# never-sent 499): each status must be documented for each job endpoint.
JOB_ENDPOINT_ERRORS = (
    worker.InvalidRequest, worker.InvalidJson, worker.Unauthorized, worker.Forbidden, worker.LengthRequired,
    worker.BodyTooLarge, worker.InputTooLong, worker.PromptTooLong, worker.UnsupportedMediaType,
    worker.WorkerError, worker.GenerationFailed, worker.EmptyOutput, worker.NpuProofFailed, worker.Busy,
    worker.Loading, worker.ShuttingDown, worker.RequestTimeout,
)


def test_every_error_reachable_on_the_job_endpoints_has_its_status_documented(document: dict[str, Any]) -> None:
    contract = contract_error_statuses()
    assert len(contract) >= 25  # the table was found and read
    reachable = {error.type: error.status for error in JOB_ENDPOINT_ERRORS}
    for error_type, status in reachable.items():
        assert contract[error_type] == status, error_type  # the code and the contract agree
    assert contract_job_endpoint_statuses() == {200, *reachable.values()}
    for path in JOB_PATHS:
        responses = document["paths"][path]["post"]["responses"]
        assert {int(status) for status in responses} == {200, *reachable.values()}, path
        for status in reachable.values():
            error_schema = resolve(document, responses[str(status)]["content"]["application/json"]["schema"])
            assert error_schema["required"] == ["error", "request_id"]
        assert (resolve(document, responses["200"]["content"]["application/json"]["schema"])
                is document["components"]["schemas"]["Result"])


def test_the_get_endpoints_document_their_errors(document: dict[str, Any]) -> None:
    for path, operations in document["paths"].items():
        if "get" not in operations:
            continue
        statuses = set(operations["get"]["responses"])
        assert {"200", "403", "503"} <= statuses, path  # 503: loading, busy (health-only connection) or unhealthy
        assert ("401" in statuses) == (path != "/livez"), path  # /livez needs no token


def test_result_health_and_error_schemas_are_the_contracts_tables(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    result = schemas["Result"]
    fields = [code(row[0]) for row in table(section("#### Result fields"))]
    top = {name.split(".")[0] for name in fields}
    assert set(result["properties"]) == top
    assert set(result["required"]) == top - {"candidates", "json_valid"}  # memory_candidate only
    for parent in ("tokens", "timing_ms"):
        nested = {name.split(".")[1] for name in fields if name.startswith(parent + ".")}
        optional = {"load"} if parent == "timing_ms" else set()  # only after an idle unload (issue 16)
        assert set(result["properties"][parent]["properties"]) == nested
        assert set(result["properties"][parent]["required"]) == nested - optional
    assert result["properties"]["finish_reason"]["enum"] == ["stop", "length"]
    assert result["properties"]["job"]["enum"] == list(worker.JOBS)
    health = resolve(document,
                     document["paths"]["/healthz"]["get"]["responses"]["200"]["content"]["application/json"]["schema"])
    health_fields = {code(row[0]) for row in table(section("### GET /healthz"))}
    assert set(health["properties"]) == health_fields == set(health["required"])
    assert health["properties"]["status"]["enum"] == ["ok", "loading", "stopping"]
    error = schemas["Error"]
    assert error["required"] == ["error", "request_id"]
    assert error["properties"]["error"]["required"] == ["type", "message"]


@pytest.mark.parametrize(
    "path, fields, job",
    [("/v1/worker/condense-notification", {}, "notification"), ("/v1/worker/generate", {"job": "title"}, "title")],
    ids=["condense-notification", "generate-title"],
)
def test_the_schema_and_the_worker_agree_on_the_jobs_token_maximum(
    live: worker.WorkerHTTPServer, document: dict[str, Any], path: str, fields: dict[str, Any], job: str
) -> None:
    maximum = worker.job_token_limits(worker.JOBS[job], worker.Limits())[1]
    validator = OAS30Validator(request_schema(document, path))
    at_maximum = {**fields, "input": "x", "max_new_tokens": maximum}
    validator.validate(at_maximum)  # valid by the document...
    assert call(live, "POST", path, at_maximum)[0] == 200  # ...and taken by the worker
    over = {**at_maximum, "max_new_tokens": maximum + 1}
    assert not validator.is_valid(over)  # invalid by the document...
    assert call(live, "POST", path, over)[0] == 400  # ...and refused by the worker


def test_with_a_token_the_document_says_livez_needs_none(tmp_path: Path) -> None:
    document = worker.openapi_document(cpu_settings(tmp_path, token=TOKEN))
    assert document["paths"]["/livez"]["get"].get("security") == []


def test_servers_names_the_port_the_worker_listens_on(live: worker.WorkerHTTPServer, document: dict[str, Any]) -> None:
    assert document["servers"] == [{"url": f"http://127.0.0.1:{live.server_port}"}]


# --- (b) schemathesis against the live worker ------------------------------------------------------

OPERATIONS = ([(path, "GET") for path in ("/livez", "/healthz", "/models", "/metrics", "/openapi.json")]
              + [(path, "POST") for path in JOB_PATHS])
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def api_schema(live: worker.WorkerHTTPServer) -> Any:
    return schemathesis.openapi.from_url(f"http://127.0.0.1:{live.server_port}/openapi.json", timeout=10)


def test_schemathesis_sees_every_operation(api_schema: Any) -> None:
    operations = {(result.ok().path, result.ok().method.upper()) for result in api_schema.get_all_operations()}
    # schemathesis leaves out the path it loaded the document from; the run below asks for it by name.
    assert operations == set(OPERATIONS) - {("/openapi.json", "GET")}
    assert api_schema["/openapi.json"]["GET"].path == "/openapi.json"


@pytest.mark.parametrize("field", ["max_new_tokens", "timeout_s"])
def test_null_for_an_optional_number_is_400_as_the_schema_says(
    live: worker.WorkerHTTPServer, document: dict[str, Any], field: str
) -> None:
    body = {"job": "title", "input": "x", field: None}
    assert not OAS30Validator(request_schema(document, "/v1/worker/generate")).is_valid(body)
    status, _, reply = call(live, "POST", "/v1/worker/generate", body)
    assert (status, reply["error"]["type"]) == (400, "invalid_request")


@pytest.mark.parametrize(
    "path, method, mode",
    [(path, method, GenerationMode.POSITIVE) for path, method in OPERATIONS]
    + [(path, "POST", GenerationMode.NEGATIVE) for path in JOB_PATHS],  # a GET without parameters has no negative data
    ids=lambda value: value.value if isinstance(value, GenerationMode) else str(value),
)
def test_schemathesis_finds_no_server_error_and_no_nonconformance(
    live: worker.WorkerHTTPServer, api_schema: Any, path: str, method: str, mode: GenerationMode
) -> None:
    base_url = f"http://127.0.0.1:{live.server_port}"
    operation = api_schema[path][method]
    statuses: list[int] = []
    answers: list[int] = []

    @settings(max_examples=50, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, timeout=10)
        statuses.append(response.status_code)
        answers.append(response.status_code)
        case.validate_response(response, checks=CHECKS)
        if response.status_code >= 500:
            # The one 5xx a healthy worker gives: the client's own deadline was too short to meet.
            body = response.json()
            tiny_deadline = (isinstance(case.body, dict) and isinstance(case.body.get("timeout_s"), float)
                             and case.body["timeout_s"] < 0.01)
            assert (response.status_code, body["error"]["type"], tiny_deadline) == (504, "timeout", True), (
                case.body, body)

    run()
    assert statuses, "schemathesis sent nothing"
    if method == "POST":
        assert len(statuses) >= 20
        if mode is GenerationMode.POSITIVE:
            assert 200 in statuses  # the generated data does reach the pipeline
        else:
            # Every schema-invalid request is refused.
            assert all(400 <= status < 500 for status in answers), answers
