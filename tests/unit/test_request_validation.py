"""Unit tests of the request checks (gateway and expert): limits, sampling fields, context fit, rendering."""

from __future__ import annotations

import math
from pathlib import Path

import grpc
import pytest

from expertmesh.config import LimitsConfig
from expertmesh.errors import EXPERT_LIMIT, REASON_KEY, MeshError, status_for, trailers_for
from expertmesh.services.expert.prompt import render
from expertmesh.services.expert.request import DEFAULT_MAX_TOKENS, fit_max_tokens, sampling_params
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.validation import check_request, quote, sampling_kwargs

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_tokens": 0}, "sampling.max_tokens must be > 0, got 0"),
        ({"temperature": -0.5}, "sampling.temperature must be in [0, 2], got -0.5"),
        ({"temperature": 2.5}, "sampling.temperature must be in [0, 2], got 2.5"),
        ({"temperature": math.inf}, "sampling.temperature must be in [0, 2], got inf"),
        ({"temperature": math.nan}, "sampling.temperature must be in [0, 2], got nan"),
        ({"time_limit_s": 0}, "sampling.time_limit_s must be in (0, 86400], got 0.0"),
        ({"time_limit_s": -1}, "sampling.time_limit_s must be in (0, 86400], got -1.0"),
        ({"time_limit_s": math.nan}, "sampling.time_limit_s must be in (0, 86400], got nan"),
        ({"top_p": 0.0}, "sampling.top_p must be in (0, 1], got 0.0"),
        ({"top_p": 1.5}, "sampling.top_p must be in (0, 1], got 1.5"),
        ({"top_k": -2}, "sampling.top_k must be -1, 0 (disabled) or > 0, got -2"),
        ({"logprobs": 21}, "sampling.logprobs must be <= 20, got 21"),
        ({"seed": 2**63}, f"sampling.seed must be <= {2**63 - 1}, got {2**63}"),
        ({"stop": ["x"] * 17}, "sampling.stop has 17 strings; the limit is 16"),
        ({"stop": ["ok", ""]}, "sampling.stop[1] must be 1..256 characters long, got 0"),
        ({"stop": ["y" * 257]}, "sampling.stop[0] must be 1..256 characters long, got 257"),
    ],
)
def test_bad_sampling_fields_are_invalid_argument(fields: dict[str, object], message: str) -> None:
    with pytest.raises(MeshError) as err:
        sampling_kwargs(pb.SamplingParams(**fields))  # type: ignore[arg-type]
    assert status_for(err.value) == (INVALID, message)


def test_good_sampling_fields_reach_vllm() -> None:
    kwargs = sampling_kwargs(
        pb.SamplingParams(temperature=0.5, top_p=0.9, top_k=-1, seed=7, stop=["\n"], logprobs=0)
    )
    params = sampling_params(kwargs, max_tokens=10)
    assert (params.temperature, params.top_k, params.seed, params.stop, params.logprobs) == (
        0.5,
        0,
        7,
        ["\n"],
        0,
    )
    assert params.max_tokens == 10 and params.top_p == pytest.approx(0.9)


def test_context_fit() -> None:
    unset = pb.SamplingParams()
    assert fit_max_tokens(10, unset, 1024) == DEFAULT_MAX_TOKENS
    assert fit_max_tokens(1000, unset, 1024) == 24  # the default shrinks to what fits
    assert fit_max_tokens(10, pb.SamplingParams(max_tokens=1014), 1024) == 1014
    cases = [
        (2000, unset, "prompt has 2000 tokens; this expert's max_model_len is 1024"),
        (1024, unset, "prompt has 1024 tokens; this expert's max_model_len is 1024, which leaves no room"),
        (
            10,
            pb.SamplingParams(max_tokens=1015),
            "sampling.max_tokens is 1015, but the prompt has 10 tokens and this expert's max_model_len "
            "is 1024: at most 1014 new tokens fit",
        ),
    ]
    for prompt_tokens, sampling, message in cases:
        with pytest.raises(MeshError) as err:
            fit_max_tokens(prompt_tokens, sampling, 1024)
        code, details = status_for(err.value)
        assert code == INVALID and details.startswith(message)
        # the expert's own limit, not the request's: the gateway may try another expert
        assert trailers_for(err.value) == ((REASON_KEY, EXPERT_LIMIT),)


LIMITS = LimitsConfig(max_request_bytes=64 * 1024, max_messages=4)


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        (
            {"prompt": "p" * 70_000},
            "the request is 70004 bytes; the limit is 65536 (limits.max_request_bytes)",
        ),
        ({"prompt": "x", "request_id": "r" * 129}, "request_id has 129 characters; the limit is 128"),
        (
            {"prompt": "x", "request_id": "a\nforged log line"},
            "request_id 'a\\nforged log line' contains non-printable characters",
        ),
        ({"prompt": "x", "domain": "d" * 5000}, "domain has 5000 characters; the limit is 128"),
        ({"prompt": "x", "expert_id": "e" * 200}, "expert_id has 200 characters; the limit is 128"),
        (
            {"prompt": "x", "messages": [pb.Message(role="user", content="hi")]},
            "set either prompt or messages, not both",
        ),
        ({}, "the request has neither prompt nor messages"),
        (
            {"messages": [pb.Message(role="user", content="hi")] * 5},
            "messages has 5 turns; the limit is 4 (limits.max_messages)",
        ),
        (
            {"messages": [pb.Message(role="robot", content="beep")]},
            "messages[0].role 'robot' is not one of system, user, assistant, tool",
        ),
        (
            {"messages": [pb.Message(role="r" * 9000, content="beep")]},
            f"messages[0].role {'r' * 48!r}... (9000 characters) is not one of system, user, assistant, tool",
        ),
    ],
)
def test_request_limits_are_checked_first(request_fields: dict[str, object], message: str) -> None:
    with pytest.raises(MeshError) as err:
        check_request(pb.GenerateRequest(**request_fields), LIMITS)  # type: ignore[arg-type]
    assert status_for(err.value) == (INVALID, message)


def test_a_good_request_passes_with_its_sampling() -> None:
    request = pb.GenerateRequest(
        request_id="r-1", prompt="hi", sampling=pb.SamplingParams(temperature=0.0, time_limit_s=2.5)
    )
    assert check_request(request, LIMITS) == {"ignore_eos": False, "temperature": 0.0}


def test_quote_cuts_long_values() -> None:
    assert quote("short") == "'short'"
    assert quote("x" * 100, 10) == "'xxxxxxxxxx'... (100 characters)"


def test_limits_must_fit_one_link_message() -> None:
    with pytest.raises(ValueError, match=r"max_request_bytes .* must be at least 64 KiB below"):
        LimitsConfig(max_request_bytes=4 * 1024 * 1024)
    with pytest.raises(ValueError, match=r"link_batch_bytes .* must not exceed"):
        LimitsConfig(max_message_bytes=1024 * 1024, link_batch_bytes=2 * 1024 * 1024, max_request_bytes=1024)


class _Tokenizer:
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

    def apply_chat_template(self, turns: list[dict[str, str]], **kwargs: object) -> str:
        import jinja2

        template = jinja2.Environment().from_string(str(kwargs["chat_template"]))
        return template.render(messages=turns)


def test_prompt_and_messages() -> None:
    tok = _Tokenizer()
    assert render("hello", [], tok, None) == ("hello", True)
    turns = [pb.Message(role="system", content="be brief"), pb.Message(role="user", content="hi")]
    assert render("", turns, tok, None) == ("<system>be brief<user>hi", False)
    assert render("", turns, tok, "{{ messages | length }}") == ("2", False)


def test_an_experts_system_prompt_goes_first_unless_the_request_has_one() -> None:
    tok, system = _Tokenizer(), "you write code"
    user = [pb.Message(role="user", content="hi")]
    assert render("", user, tok, None, system) == ("<system>you write code<user>hi", False)
    own = [pb.Message(role="system", content="be brief"), *user]
    assert render("", own, tok, None, system) == ("<system>be brief<user>hi", False)
    assert render("hi", [], tok, None, system) == ("hi", True)  # a raw prompt is left as it is


def test_model_without_chat_template_is_unimplemented() -> None:
    tok = _Tokenizer()
    tok.chat_template = ""
    with pytest.raises(MeshError) as err:
        render("", [pb.Message(role="user", content="hi")], tok, None)
    code, details = status_for(err.value)
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert details.startswith("this expert's model has no chat template, so messages cannot be rendered")


def test_template_errors_are_invalid_argument() -> None:
    template = "{{ raise_exception('roles must alternate') }}"

    class Raising(_Tokenizer):
        def apply_chat_template(self, turns: list[dict[str, str]], **kwargs: object) -> str:
            import jinja2

            def raise_exception(message: str) -> None:
                raise jinja2.TemplateError(message)

            env = jinja2.Environment()
            env.globals["raise_exception"] = raise_exception
            return env.from_string(template).render(messages=turns)

    with pytest.raises(MeshError) as err:
        render("", [pb.Message(role="user", content="hi")], Raising(), None)
    assert status_for(err.value) == (
        INVALID,
        "messages cannot be rendered with this expert's chat template: roles must alternate",
    )
    assert trailers_for(err.value) == ((REASON_KEY, EXPERT_LIMIT),)


def test_demo_model_template_renders(demo_models: list[Path]) -> None:
    """The real tokenizer of a demo model, loaded as the expert loads it."""
    from expertmesh.config import ExpertConfig
    from expertmesh.services.expert.tokenizer import load_tokenizer

    cfg = ExpertConfig(expert_id="t", domain="general", model_path=str(demo_models[0]))
    tok = load_tokenizer(cfg)
    text, special = render("", [pb.Message(role="user", content="Hello!")], tok, None)
    assert "Hello!" in text and not special


def test_tokens_are_coalesced_only_under_load() -> None:
    from expertmesh.services.expert.stream import stream_interval

    schedule = {0: 1, 1: 1, 4: 1, 5: 8, 16: 8, 32: 8, 64: 8, 65: 16, 128: 16}
    assert {n: stream_interval(n) for n in schedule} == schedule
    assert [stream_interval(n, 1) for n in (1, 128)] == [1, 1]  # configured: fixed
    assert stream_interval(128, 3) == 3
