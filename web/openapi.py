"""The OpenAPI 3.1 description of the JSON API, the webhook receiver and /healthz (served at
/api/v1/openapi.json; tests/web/test_schemathesis.py fuzzes the app against it).

The request bodies and the main answers (job, rule, error) are web/schemas.py's pydantic models, rendered here as
JSON Schema: the same objects validate the requests, so this document cannot drift from what the API accepts.
Paths, parameters, security and status codes are stated here.
"""

from __future__ import annotations

from pydantic import BaseModel

from .schemas import REQUESTS, RESPONSES

REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
ID = r"^[0-9a-f]{32}$"
STATUSES = ["queued", "running", "succeeded", "failed", "cancelled", "skipped"]
DTYPES = ["auto", "bfloat16", "float16", "float32"]


def _nullable(kind: str, **extra) -> dict:
    return {"type": [kind, "null"], **extra}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str, headers: dict | None = None) -> dict:
    out = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _error(description: str, headers: dict | None = None) -> dict:
    return _json(_ref("Error"), description, headers)


def _from_models() -> dict:
    """Component schemas from the models: requests as validated, answers as serialized. Nested models come out of
    pydantic as `$defs`; they become components of their own, referred to by `#/components/schemas/<Model>`."""
    out: dict = {}

    def add(model: type[BaseModel], mode: str) -> None:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
        out.update(schema.pop("$defs", {}))
        out[model.__name__] = schema

    for model in REQUESTS:
        add(model, "validation")
    for model in RESPONSES:
        add(model, "serialization")
    return out


RETRY_AFTER = {"Retry-After": {"description": "Seconds until the rate limit resets", "schema": {"type": "string"}}}
ERRORS = {
    "400": _error("Malformed body: not UTF-8 JSON, nested deeper than 32, duplicate keys, NaN/Infinity, "
                  "numbers out of range, NUL or lone surrogates in strings"),
    "401": _error("No token, or a token the Hub does not accept"),
    "403": _error("You can see this job but may not act on it (only its owner or members with write access to its "
                  "target namespace may)"),
    "404": _error("No such resource, or not yours (never 403: existence is not revealed)"),
    "405": _error("Method not allowed"),
    "409": _error("The resource is not in a state that allows this"),
    "413": _error("Request body too large (64 KiB)"),
    "415": _error("The body is not sent as JSON (Content-Type: application/json, UTF-8)"),
    "422": _error("Invalid input; `field` names the offending field"),
    "429": _error("Rate limit exceeded", RETRY_AFTER),
    "503": _error("The Hub (to verify the token) is unreachable"),
}


def _errors(*codes: str) -> dict:
    return {code: ERRORS[code] for code in codes}


AUTHED = ("401", "429", "503")
JOB_ID = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
RULE_ID = {"name": "rule_id", "in": "path", "required": True, "schema": {"type": "string"}}

SCHEMAS = {
    **_from_models(),
    "JobList": {
        "type": "object",
        "required": ["jobs", "next"],
        "properties": {"jobs": {"type": "array", "items": _ref("Job")},
                       "next": _nullable("string", description="cursor of the next page")},
    },
    "LogLine": {
        "type": "object",
        "required": ["id", "at", "level", "message"],
        "properties": {"id": {"type": "integer"}, "at": {"type": "string", "format": "date-time"},
                       "level": {"type": "string"}, "message": {"type": "string"}},
    },
    "LogPage": {
        "type": "object",
        "required": ["logs", "next", "last_id"],
        "properties": {"logs": {"type": "array", "items": _ref("LogLine")},
                       "next": _nullable("integer", description="pass as `after` for the next page (null: no more now)"),
                       "last_id": {"type": "integer", "description": "pass as `after` to tail"}},
    },
    "HubWebhook": {
        "type": "object",
        "description": "The Hub's webhook payload (version 3); only repo.content on model repos is acted on",
        "properties": {
            "event": {"type": "object", "properties": {"action": {"type": "string"}, "scope": {"type": "string"}}},
            "repo": {"type": "object", "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                                      "headSha": {"type": "string"}}},
            "updatedRefs": {"type": "array", "items": {"type": "object", "properties": {
                "ref": {"type": "string"}, "oldSha": _nullable("string"), "newSha": _nullable("string")}}},
            "webhook": {"type": "object", "properties": {"id": {"type": "string"}, "version": {"type": "integer"}}},
        },
    },
    "Health": {
        "type": "object",
        "required": ["status", "database", "broker"],
        "properties": {"status": {"type": "string", "enum": ["ok", "unavailable"]},
                       "database": {"type": "string"}, "broker": {"type": "string"}},
    },
}


def spec(public_url: str) -> dict:
    secured = [{"bearer": []}]
    body = lambda name: {"required": True, "content": {"application/json": {"schema": _ref(name)}}}  # noqa: E731
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "lorafold",
            "version": "1",
            "description": "Merge (fold) PEFT LoRA adapters into their base models and publish them on the Hugging "
                           "Face Hub. Authenticate with `Authorization: Bearer <Hugging Face token>`.",
        },
        "servers": [{"url": public_url.rstrip("/") or "/"}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "A Hugging Face user access token or OAuth token"}},
            "schemas": SCHEMAS,
        },
        "paths": {
            "/api/v1/jobs": {
                "post": {
                    "operationId": "createJob",
                    "summary": "Queue a merge of an adapter into its base, published to `target`",
                    "security": secured,
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                    "schema": {"type": "string", "pattern": r"^[\x21-\x7e]{1,200}$"},
                                    "description": "a retried request with the same key returns the same job"}],
                    "requestBody": body("JobCreate"),
                    "responses": {"202": _json(_ref("JobAccepted"), "Queued (or the job of an earlier request with "
                                                                    "this Idempotency-Key)"),
                                  **_errors("400", "413", "415", "422", *AUTHED)},
                },
                "get": {
                    "operationId": "listJobs",
                    "summary": "Your jobs and your organizations' jobs, newest first",
                    "security": secured,
                    "parameters": [
                        {"name": "status", "in": "query", "schema": {"type": "string", "enum": STATUSES}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
                        {"name": "cursor", "in": "query", "schema": {"type": "string", "maxLength": 200}},
                    ],
                    "responses": {"200": _json(_ref("JobList"), "One page of jobs"), **_errors("422", *AUTHED)},
                },
            },
            "/api/v1/jobs/{job_id}": {
                "get": {
                    "operationId": "getJob",
                    "summary": "One job: status, progress, stats, result, error",
                    "security": secured,
                    "parameters": [JOB_ID],
                    "responses": {"200": _json(_ref("Job"), "The job"), **_errors("404", *AUTHED)},
                },
            },
            "/api/v1/jobs/{job_id}/logs": {
                "get": {
                    "operationId": "getJobLogs",
                    "summary": "The job's log lines after `after`, oldest first",
                    "security": secured,
                    "parameters": [
                        JOB_ID,
                        {"name": "after", "in": "query", "schema": {"type": "integer", "minimum": 0}},
                        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}},
                    ],
                    "responses": {"200": _json(_ref("LogPage"), "Log lines"), **_errors("404", "422", *AUTHED)},
                },
            },
            "/api/v1/jobs/{job_id}/cancel": {
                "post": {
                    "operationId": "cancelJob",
                    "summary": "Cancel a queued or running job",
                    "security": secured,
                    "parameters": [JOB_ID],
                    "responses": {"202": _json(_ref("Job"), "Cancelled, or cancelling"),
                                  **_errors("403", "404", "409", "413", *AUTHED)},
                },
            },
            "/api/v1/jobs/{job_id}/retry": {
                "post": {
                    "operationId": "retryJob",
                    "summary": "Queue a failed, cancelled or skipped job again with your current token",
                    "security": secured,
                    "parameters": [JOB_ID],
                    "responses": {"202": _json(_ref("Job"), "Queued again"), **_errors("403", "404", "409", "413", *AUTHED)},
                },
            },
            "/api/v1/rules": {
                "post": {
                    "operationId": "createRule",
                    "summary": "Create an automation rule (webhook URL and secret are in the answer, only there)",
                    "security": secured,
                    "requestBody": body("RuleCreate"),
                    "responses": {"201": _json(_ref("Rule"), "The new rule with its secret"),
                                  **_errors("400", "413", "415", "422", *AUTHED)},
                },
                "get": {
                    "operationId": "listRules",
                    "summary": "Your automation rules",
                    "security": secured,
                    "responses": {"200": _json({"type": "object", "required": ["rules"],
                                                "properties": {"rules": {"type": "array", "items": _ref("Rule")}}},
                                               "Your rules"), **_errors(*AUTHED)},
                },
            },
            "/api/v1/rules/{rule_id}": {
                "get": {
                    "operationId": "getRule",
                    "summary": "One rule and its run history",
                    "security": secured,
                    "parameters": [RULE_ID],
                    "responses": {"200": _json(_ref("Rule"), "The rule with its deliveries"),
                                  **_errors("404", *AUTHED)},
                },
                "delete": {
                    "operationId": "deleteRule",
                    "summary": "Delete a rule and the token it kept",
                    "security": secured,
                    "parameters": [RULE_ID],
                    "responses": {"204": {"description": "Deleted"}, **_errors("404", *AUTHED)},
                },
            },
            "/api/v1/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "OpenAPI 3.1",
                                          "content": {"application/json": {"schema": {"type": "object"}}}}},
                },
            },
            "/hooks/hub/{rule_id}": {
                "post": {
                    "operationId": "hubWebhook",
                    "summary": "The Hugging Face Hub's webhook for one rule (X-Webhook-Secret: the rule's secret)",
                    "security": [],
                    "parameters": [RULE_ID, {"name": "X-Webhook-Secret", "in": "header", "required": True,
                                             "schema": {"type": "string"}}],
                    "requestBody": body("HubWebhook"),
                    "responses": {
                        "200": _json({"type": "object", "required": ["ignored", "reason"],
                                      "properties": {"ignored": {"const": True}, "reason": {"type": "string"}}},
                                     "Received and ignored (with the reason)"),
                        "202": _json({"type": "object", "required": ["job", "duplicate"],
                                      "properties": {"job": {"type": "string"}, "duplicate": {"type": "boolean"}}},
                                     "A merge is queued (or was, for this push)"),
                        **_errors("400", "401", "413", "415", "429"),
                    },
                },
            },
            "/healthz": {
                "get": {
                    "operationId": "health",
                    "summary": "Database and broker reachability",
                    "security": [],
                    "responses": {"200": _json(_ref("Health"), "All reachable"),
                                  "503": _json(_ref("Health"), "Something is down (named)")},
                },
            },
        },
    }
