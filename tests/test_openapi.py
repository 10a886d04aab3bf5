"""GET /admin/openapi.json: it describes exactly the routes the application registers, and
the running gateway answers as it says (schemathesis from PyPI, a bounded run)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.app import create_app
from tests.conftest import ADMIN_TOKEN, make_settings, webchat_endpoint

METHODS = ("get", "put", "post", "delete", "patch")


def registered_admin_routes(app: web.Application) -> set[tuple[str, str]]:
    routes: set[tuple[str, str]] = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if path.startswith("/admin") and route.method != "HEAD":
            routes.add((route.method.lower(), path))
    return routes


def documented_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method, path) for path, item in document["paths"].items() for method in METHODS if method in item}


async def test_the_document_lists_every_admin_route_and_nothing_else(tmp_path: Path, start_gateway: Any) -> None:
    settings = make_settings(tmp_path, [webchat_endpoint()])
    gateway = await start_gateway(settings)
    response = await gateway.client.get("/admin/openapi.json", headers=gateway.admin_headers())
    assert response.status == 200
    document = await response.json()
    assert document["openapi"].startswith("3.1")
    routes = registered_admin_routes(create_app(settings))
    assert len(routes) >= 17
    assert documented_routes(document) == routes
    # Every operation names its errors, all in the one error shape.
    for path, item in document["paths"].items():
        for method in METHODS:
            if method not in item:
                continue
            answers = item[method]["responses"]
            assert "404" in answers, (method, path)
            if path != "/admin/ui":
                assert "401" in answers, (method, path)
            for status, answer in answers.items():
                if status.startswith(("4", "5")):
                    assert answer == {"$ref": f"#/components/responses/E{status}"}
    error = document["components"]["responses"]["E400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/Error"}
    limits = [p for p in document["paths"]["/admin/sessions"]["get"]["parameters"] if p["name"] == "limit"]
    assert limits and "1000" in limits[0]["description"]
    unauthorized = await gateway.client.get("/admin/openapi.json")
    assert unauthorized.status == 401 and await unauthorized.json() == {"error": "missing or wrong bearer token"}


async def test_schemathesis_finds_the_gateway_as_documented(tmp_path: Path, start_gateway: Any, open_chat: Any) -> None:
    """Generated requests (valid and invalid) against every operation: never a 5xx, only the
    documented statuses, content types and body shapes. Bounded: few examples, a time cap."""
    gateway = await start_gateway(make_settings(tmp_path, [webchat_endpoint(minutes=0)]))
    chat = await open_chat(gateway, "st")  # something to list
    await chat.say("hello")
    await chat.wait_messages(1)
    url = str(gateway.client.make_url("/admin/openapi.json"))
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        url,
        "--header",
        f"Authorization: Bearer {ADMIN_TOKEN}",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--phases",
        "examples,coverage,fuzzing",
        "--max-examples",
        "10",
        "--seed",
        "13",
        "--workers",
        "1",
        "--no-shrink",
        "--suppress-health-check",
        "all",
        "--generation-database",
        "none",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=90)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-6000:]
    assert "No issues found" in text or "passed" in text, text[-3000:]
