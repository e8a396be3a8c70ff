"""Unit tests of the HTTP front's pure parts: bodies, the status table, model names, timeouts."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from expertmesh.config import ConfigError, MeshConfig, parse_config
from expertmesh.errors import (
    HTTP_STATUS,
    InvalidRequest,
    NotFound,
    RateLimited,
    ResourceExhausted,
    http_status,
    retry_after_s,
)
from expertmesh.gateway.openai_api.app import BodyError, error_body, parse_body
from expertmesh.gateway.openai_api.context import parse_timeout
from expertmesh.gateway.openai_api.convert import Answer, generate_request, route_fields
from expertmesh.gateway.openai_api.schema import ChatCompletionRequest, CompletionRequest
from expertmesh.v1 import expertmesh_pb2 as pb


def mesh() -> MeshConfig:
    experts = [
        {"expert_id": "g", "model_path": "/m/g", "domain": "general"},
        {"expert_id": "c", "model_path": "/m/c", "domain": "code"},
    ]
    return MeshConfig.model_validate({"experts": experts})


@pytest.mark.parametrize(
    ("raw", "message", "param"),
    [
        (
            b'{"model": "auto", "messages": [], "n": 1}',
            "messages: List should have at least 1 item",
            "messages",
        ),
        (b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "n": 3}', "n must be 1", None),
        (b'{"model": "auto", "prompt": "x", "best_of": 2}', "unknown field", "best_of"),
        (
            b'{"model": "auto", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
            "needs",
            None,
        ),
        (b"{not json", "the body is not valid JSON", None),
    ],
)
def test_bodies_are_strict_and_name_the_field(raw: bytes, message: str, param: str | None) -> None:
    model = CompletionRequest if b"prompt" in raw else ChatCompletionRequest
    with pytest.raises(BodyError) as e:
        parse_body(raw, model)
    assert message in str(e.value)
    assert e.value.param == param
    status, body, _ = error_body(e.value)
    assert (
        status == 400 and body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"
    )


def test_the_status_table_keeps_each_meaning() -> None:
    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: 400,
        grpc.StatusCode.UNAUTHENTICATED: 401,
        grpc.StatusCode.PERMISSION_DENIED: 403,
        grpc.StatusCode.NOT_FOUND: 404,
        grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
        grpc.StatusCode.UNAVAILABLE: 503,
        grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    }
    for code, status in expected.items():
        assert HTTP_STATUS[code][0] == status
    assert http_status(grpc.StatusCode.INTERNAL) == (500, "server_error")


def test_retry_after_comes_from_the_pushback() -> None:
    assert retry_after_s(RateLimited("t", 2.5)) == 2.5
    assert retry_after_s(ResourceExhausted("full")) == 1.0
    assert retry_after_s(NotFound("x")) is None
    _, _, headers = error_body(RateLimited("t", 2.5))
    assert headers == {"retry-after": "3"}  # whole seconds, rounded up


def test_model_names_an_expert_a_domain_or_auto() -> None:
    config = mesh()
    assert route_fields("g", config) == {"expert_id": "g"}
    assert route_fields("code", config) == {"domain": "code"}
    assert route_fields("auto", config) == {}
    with pytest.raises(NotFound) as e:
        route_fields("gpt-4o", config)
    assert str(e.value) == "model 'gpt-4o' is not an expert id (g, c), a domain (general, code) or 'auto'"


def test_the_request_the_grpc_front_would_get() -> None:
    body = parse_body(
        b'{"model": "code", "messages": [{"role": "system",'
        b'"content": [{"type": "text", "text": "be brief"}]},'
        b'{"role": "user", "content": "hi"}], "max_completion_tokens": 5, "temperature": 0, "stop": "\\n",'
        b'"seed": 3, "logprobs": true, "top_logprobs": 2, "user": "u1"}',
        ChatCompletionRequest,
    )
    request = generate_request(body, mesh(), "rid")
    assert request.domain == "code" and request.request_id == "rid"
    assert [(m.role, m.content) for m in request.messages] == [("system", "be brief"), ("user", "hi")]
    s = request.sampling
    assert (s.max_tokens, s.temperature, list(s.stop), s.seed, s.logprobs) == (5, 0.0, ["\n"], 3, 2)
    assert not s.HasField("top_p")
    text = generate_request(parse_body(b'{"model": "c", "prompt": ["x"]}', CompletionRequest), mesh(), "r")
    assert (text.prompt, text.expert_id, text.sampling.HasField("max_tokens")) == ("x", "c", False)


def test_answers_in_openai_shape() -> None:
    first = pb.GenerateResponse(text="a", token_ids=[1], expert_id="c", request_id="r")
    last = pb.GenerateResponse(
        text="b",
        token_ids=[2],
        finish_reason="time_limit",
        usage=pb.Usage(prompt_tokens=3, completion_tokens=2),
    )
    whole = Answer(True, "r", logprobs=False).whole([first, last])
    assert whole["choices"] == [
        {
            "index": 0,
            "finish_reason": "length",
            "message": {"role": "assistant", "content": "ab"},
            "logprobs": None,
        }
    ]
    assert whole["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert (whole["id"], whole["model"]) == ("chatcmpl-r", "c")
    answer = Answer(False, "r", logprobs=False)
    chunk = answer.chunk(first, True, continuous_usage=True)
    assert chunk["choices"][0]["text"] == "a"
    assert chunk["usage"] == {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}  # so far
    assert answer.chunk(last, False, continuous_usage=True)["usage"]["total_tokens"] == 5


def test_timeout_header() -> None:
    assert parse_timeout(None) is None
    assert parse_timeout("2.5") == 2.5
    for bad in ("0", "-1", "nan", "soon", "1e9"):
        with pytest.raises(InvalidRequest) as e:
            parse_timeout(bad)
        assert str(e.value).startswith("header x-request-timeout must be seconds in (0, 86400]")


def test_http_port_must_differ_from_the_grpc_port() -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(
            '{"gateway": {"port": 9000, "http_port": 9000},'
            '"experts": [{"expert_id": "g", "model_path": "/m"}]}',
            Path("mesh.json"),
        )
    assert "gateway.http_port 9000 is also gateway.port" in str(e.value)
