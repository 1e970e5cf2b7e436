"""Error bodies and FastAPI handlers: every failure answers the OpenAI-style JSON error."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from parallax.serving.errors import (
    ERROR_TYPES,
    APIError,
    error_body,
    error_response,
    install_error_handlers,
)
from parallax.serving.openai_schemas import parse_chat_request, parse_json_body


class Item(BaseModel):
    n: int


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/api-error/{status}")
    async def api_error(status: int) -> dict:
        raise APIError(status, f"boom {status}")

    @app.post("/typed")
    async def typed(item: Item) -> dict:
        return {"n": item.n}

    @app.post("/raw-json")
    async def raw_json(request: Request) -> dict:
        return await request.json()

    @app.post("/chat")
    async def chat(request: Request) -> dict:
        req = parse_chat_request(parse_json_body(await request.body()))
        return {"n": len(req.messages)}

    @app.get("/crash")
    async def crash() -> dict:
        raise RuntimeError("secret internal detail")

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(make_app(), raise_server_exceptions=False)


def assert_error(resp, status: int) -> dict:
    assert resp.status_code == status
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"object", "message", "type", "code"}
    assert body["object"] == "error"
    assert body["code"] == status
    assert body["type"] == ERROR_TYPES.get(status, body["type"])
    assert isinstance(body["message"], str) and body["message"]
    return body


def test_error_body_shape() -> None:
    assert error_body(429, "busy") == {
        "object": "error",
        "message": "busy",
        "type": "rate_limit_error",
        "code": 429,
    }
    assert error_body(400, "x", "custom")["type"] == "custom"
    assert error_body(418, "teapot")["type"] == "invalid_request_error"
    assert error_body(502, "bad gateway")["type"] == "internal_error"


def test_status_type_mapping() -> None:
    assert ERROR_TYPES == {
        400: "invalid_request_error",
        401: "authentication_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "internal_error",
        503: "service_unavailable",
    }


def test_api_error_attributes_and_response() -> None:
    exc = APIError(503, "no nodes")
    assert (exc.status, exc.message, exc.type) == (503, "no nodes", "service_unavailable")
    assert str(exc) == "no nodes"
    resp = error_response(exc)
    assert resp.status_code == 503
    assert b'"code":503' in resp.body


@pytest.mark.parametrize("status", sorted(ERROR_TYPES))
def test_api_error_handler(client: TestClient, status: int) -> None:
    body = assert_error(client.get(f"/api-error/{status}"), status)
    assert body["message"] == f"boom {status}"


def test_pydantic_validation_error_is_400(client: TestClient) -> None:
    body = assert_error(client.post("/typed", json={"n": "not a number"}), 400)
    assert "n" in body["message"]


def test_malformed_json_to_typed_route_is_400(client: TestClient) -> None:
    resp = client.post("/typed", content=b"{not json", headers={"content-type": "application/json"})
    body = assert_error(resp, 400)
    assert "JSON" in body["message"]


def test_malformed_json_to_raw_route_is_400(client: TestClient) -> None:
    resp = client.post("/raw-json", content=b"{oops", headers={"content-type": "application/json"})
    assert "JSON" in assert_error(resp, 400)["message"]


def test_chat_parse_errors_through_app(client: TestClient) -> None:
    assert "JSON" in assert_error(client.post("/chat", content=b"[1,"), 400)["message"]
    assert "empty" in assert_error(client.post("/chat", content=b""), 400)["message"]
    body = assert_error(client.post("/chat", json={"messages": []}), 400)
    assert "messages" in body["message"]
    assert client.post("/chat", json={"messages": [{"role": "user", "content": "hi"}]}).json() == {
        "n": 1
    }


def test_unexpected_exception_is_500_without_traceback(client: TestClient) -> None:
    resp = client.get("/crash")
    body = assert_error(resp, 500)
    assert "Traceback" not in resp.text
    assert "secret internal detail" not in body["message"]


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404)
    resp = client.get("/typed")
    assert resp.status_code == 405
    assert resp.json()["object"] == "error"
    assert resp.json()["code"] == 405
