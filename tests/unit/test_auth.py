"""Unit tests of the security logic: tokens, tenants (with a fake clock), config, certificate checks."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from expertmesh.bench.pki import CA
from expertmesh.client import MeshClient
from expertmesh.config import (
    AuthConfig,
    CertPair,
    ConfigError,
    MeshConfig,
    TenantConfig,
    load_config,
    parse_config,
)
from expertmesh.errors import InvalidRequest, PermissionDenied, RateLimited
from expertmesh.gateway.auth import Tokens, TokensError, TokensFile, bearer_token, parse_tokens
from expertmesh.gateway.router import Route
from expertmesh.gateway.server import serve
from expertmesh.gateway.tenants import Tenants
from expertmesh.guard import guard
from expertmesh.services.expert.request import DEFAULT_MAX_TOKENS
from expertmesh.telemetry import tracing
from expertmesh.telemetry.metrics import REGISTRY
from expertmesh.tls import (
    RequirePeerCertificate,
    TlsError,
    insecure_bind_refusal,
    is_loopback,
    load_pair,
)
from expertmesh.v1 import expertmesh_pb2 as pb

from ..fakes import TracedFakeExpert as FakeExpert
from ..fakes import serve_fake
from ..support import free_port, wait_serving

TOKEN_A = "a" * 24
TOKEN_B = "b-" + "x" * 30


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Aborted(Exception):
    """What the fake context raises on abort, as grpc's does."""


class FakeContext:
    """What the guards use of a grpc.aio.ServicerContext."""

    def __init__(
        self, metadata: tuple[tuple[str, str], ...] = (), auth: dict[str, Any] | None = None
    ) -> None:
        self.metadata = metadata
        self.auth = auth or {}
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def auth_context(self) -> dict[str, Any]:
        return self.auth

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise Aborted(details)


def mesh(**extra: Any) -> MeshConfig:
    experts = [
        {"expert_id": "g", "model_path": "/m/g", "domain": "general"},
        {"expert_id": "c", "model_path": "/m/c", "domain": "code"},
    ]
    return MeshConfig.model_validate({"experts": experts, **extra})


# -- tokens ---------------------------------------------------------------------------------


def test_tokens_file_lines_tenants_and_comments() -> None:
    tokens = parse_tokens(f"# ops\n{TOKEN_A} team_a\n\n{TOKEN_B}  # no tenant\n", "t.txt", {"team_a"})
    assert tokens.tenant_of(TOKEN_A) == "team_a"
    assert tokens.tenant_of(TOKEN_B) == "default"
    assert tokens.tenant_of("a" * 23) is None
    assert tokens.tenant_of("") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{TOKEN_A} nobody\n", "t.txt line 1: tenant 'nobody' is not in auth.tenants (team_a)"),
        ("short team_a\n", "t.txt line 1: a token must be 16 or more printable characters"),
        (f"{TOKEN_A} team_a extra\n", "t.txt line 1: expected 'TOKEN [TENANT]', got 3 fields"),
        (f"{TOKEN_A}\n{TOKEN_A} team_a\n", "t.txt line 2: this token is already on an earlier line"),
        ("# nothing\n", "t.txt: no tokens (every caller would be refused)"),
    ],
)
def test_tokens_file_errors_name_the_line_never_the_token(text: str, message: str) -> None:
    with pytest.raises(TokensError) as e:
        parse_tokens(text, "t.txt", {"team_a"})
    assert str(e.value) == message
    assert TOKEN_A not in str(e.value)


def test_compare_walks_every_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time: every known token is compared, also after a match (no early exit)."""
    import expertmesh.gateway.auth as auth

    calls: list[bytes] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    tokens = Tokens(((TOKEN_A.encode(), "x"), (TOKEN_B.encode(), "y"), (("c" * 20).encode(), "z")))
    assert tokens.tenant_of(TOKEN_A) == "x"
    assert len(calls) == 3


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((("authorization", f"Bearer {TOKEN_A}"),), TOKEN_A),
        ((("authorization", f"bearer  {TOKEN_A} "),), TOKEN_A),
        ((("authorization", f"Basic {TOKEN_A}"),), None),
        ((("authorization", "Bearer "),), None),
        ((("x-other", TOKEN_A),), None),
        ((), None),
    ],
)
def test_bearer_token(metadata: tuple[tuple[str, str], ...], token: str | None) -> None:
    assert bearer_token(metadata) == token


def test_tokens_file_reload_keeps_old_tokens_when_invalid(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN_A}\n")
    tokens = TokensFile(path)
    assert not tokens.refresh()  # unchanged
    path.write_text("too short\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert not tokens.refresh()
    assert tokens.tokens.tenant_of(TOKEN_A) == "default"
    path.write_text(f"{TOKEN_B}\n")
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert tokens.refresh()
    assert tokens.tokens.tenant_of(TOKEN_A) is None
    assert tokens.tokens.tenant_of(TOKEN_B) == "default"


async def test_token_interceptor_refuses_without_naming_the_token() -> None:
    from expertmesh.gateway.auth import TokenAuth, current_tenant

    class Fixed:
        tokens = parse_tokens(f"{TOKEN_A} team_a\n", "t", {"team_a"})

    auth = TokenAuth(Fixed())  # type: ignore[arg-type]
    for metadata, details in [
        ((), "this gateway needs 'authorization: Bearer <token>' metadata"),
        ((("authorization", f"Bearer {TOKEN_B}"),), "the bearer token is not valid"),
    ]:
        context = FakeContext(metadata)
        with pytest.raises(Aborted):
            await auth._check(context)  # type: ignore[arg-type]
        assert context.aborted == (grpc.StatusCode.UNAUTHENTICATED, details)
    await auth._check(FakeContext((("authorization", f"Bearer {TOKEN_A}"),)))  # type: ignore[arg-type]
    assert current_tenant.get() == "team_a"


# -- tenants --------------------------------------------------------------------------------


def request(max_tokens: int | None = 10, **fields: Any) -> pb.GenerateRequest:
    sampling = pb.SamplingParams(max_tokens=max_tokens) if max_tokens is not None else pb.SamplingParams()
    return pb.GenerateRequest(prompt="hi", sampling=sampling, **fields)


def usage(prompt: int, completion: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        finish_reason="length", usage=pb.Usage(prompt_tokens=prompt, completion_tokens=completion)
    )


def route_of(config: MeshConfig, domain: str, *expert_ids: str) -> Route:
    return Route(domain, "domain", 1.0, tuple(config.expert(i) for i in expert_ids))


def test_tenant_domains_permission_denied_and_fallbacks_dropped() -> None:
    config = mesh(auth={"tenants": {"coders": {"domains": ["code"]}}})
    tenants = Tenants(config.auth)
    allowed = tenants.permit("coders", request(), route_of(config, "code", "c", "g"))
    assert [e.expert_id for e in allowed.experts] == ["c"]  # the fallback into general is dropped
    with pytest.raises(PermissionDenied) as e:
        tenants.permit("coders", request(), route_of(config, "general", "g"))
    assert str(e.value) == "tenant coders may not use domain 'general'; its domains: code"
    with pytest.raises(PermissionDenied) as e:
        tenants.permit("coders", request(expert_id="g"), route_of(config, "general", "g"))
    assert str(e.value) == "tenant coders may not use expert 'g' (domain 'general'); its domains: code"
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    # no tenant (auth off) and an unrestricted tenant: the route as it was
    assert tenants.permit(None, request(), route_of(config, "general", "g")).experts
    assert tenants.permit("default", request(), route_of(config, "general", "g")).experts


def test_tenant_token_rate_reserve_settle_and_window() -> None:
    clock = FakeClock()
    tenants = Tenants(AuthConfig(tenants={"t": TenantConfig(tokens_per_minute=60)}), clock)
    first = tenants.admit("t", request(max_tokens=40))  # reserves 40 of 60
    with pytest.raises(RateLimited) as e:
        tenants.admit("t", request(max_tokens=30))
    assert str(e.value) == (
        "tenant t is over its token rate: 40 of 60 tokens used or reserved in the last 60 s "
        "(tokens_per_minute 60), this request reserves 30"
    )
    assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(e.value.trailers)["grpc-retry-pushback-ms"] == "1000"  # held by a stream
    first.observe(usage(5, 7))
    first.close()  # settles at the real 12 tokens
    assert tenants.state("t").used() == 12
    second = tenants.admit("t", request(max_tokens=30))
    second.observe(usage(5, 30))
    second.close()
    clock.now += 20
    with pytest.raises(RateLimited) as e:
        tenants.admit("t", request(max_tokens=20))  # 47 used + 20 > 60
    # room comes back when the first 12 tokens leave the window, 40 s from now
    assert dict(e.value.trailers)["grpc-retry-pushback-ms"] == "40000"
    clock.now += 40
    tenants.admit("t", request(max_tokens=20)).close()


def test_tenant_max_tokens_over_the_whole_budget_is_invalid() -> None:
    tenants = Tenants(AuthConfig(rate_window_s=2, tenants={"t": TenantConfig(tokens_per_minute=600)}))
    with pytest.raises(InvalidRequest) as e:
        tenants.admit("t", request(max_tokens=21))
    assert str(e.value) == (
        "sampling.max_tokens 21 is more than tenant t may use in 2 s (20 tokens at tokens_per_minute 600)"
    )
    with pytest.raises(InvalidRequest) as e:
        tenants.admit("t", request(max_tokens=None))
    assert str(e.value).startswith(
        f"sampling.max_tokens {DEFAULT_MAX_TOKENS} (unset: the default) is more than tenant t"
    )
    tenants.admit("t", request(max_tokens=20)).close()


def test_tenant_concurrent_streams() -> None:
    tenants = Tenants(AuthConfig(tenants={"t": TenantConfig(max_concurrent_streams=2)}))
    a, b = tenants.admit("t", request()), tenants.admit("t", request())
    with pytest.raises(RateLimited) as e:
        tenants.admit("t", request())
    assert str(e.value) == "tenant t has 2 streams open (max_concurrent_streams 2)"
    assert dict(e.value.trailers)["grpc-retry-pushback-ms"] == "500"
    a.close()
    a.close()  # closing twice releases once
    tenants.admit("t", request())
    b.close()
    assert tenants.state("t").streams == 1


def test_a_tenant_removed_by_a_reload_loses_its_access() -> None:
    config = mesh(auth={"tenants": {"coders": {"domains": ["code"]}}})
    tenants = Tenants(config.auth)
    tenants.permit("coders", request(), route_of(config, "code", "c"))
    tenants.apply(AuthConfig())  # its tokens may still be in the file until that changes too
    with pytest.raises(PermissionDenied) as e:
        tenants.permit("coders", request(), route_of(config, "code", "c"))
    assert str(e.value) == "tenant coders is not in auth.tenants"
    with pytest.raises(PermissionDenied):
        tenants.admit("coders", request())
    tenants.admit("default", request()).close()  # a token without a tenant still works


def test_tenant_limits_follow_a_reload_and_keep_counters() -> None:
    tenants = Tenants(AuthConfig(tenants={"t": TenantConfig(max_concurrent_streams=5)}))
    tenants.admit("t", request())
    tenants.apply(AuthConfig(tenants={"t": TenantConfig(max_concurrent_streams=1)}))
    with pytest.raises(RateLimited):
        tenants.admit("t", request())


# -- config ---------------------------------------------------------------------------------


def test_security_config_parses_and_anchors_paths(tmp_path: Path) -> None:
    text = """
gateway: {tls: {cert_file: gw.pem, key_file: gw.key, client_ca_file: callers.pem}, reflection: false}
internal_tls: {ca_file: ca.pem, cert_file: mesh.pem, key_file: mesh.key, server_name: expert.mesh}
auth: {tokens_file: tokens, rate_window_s: 5, tenants: {a: {domains: [code], tokens_per_minute: 100}}}
experts:
  - {expert_id: c, model_path: /m, domain: code, internal_cert: {cert_file: c.pem, key_file: c.key}}
  - {expert_id: g, model_path: /m, domain: general, host: 0.0.0.0, allow_insecure: true}
"""
    config = parse_config(text, tmp_path / "mesh.yaml")
    assert config.gateway.tls is not None and config.gateway.tls.cert_file == str(tmp_path / "gw.pem")
    assert not config.gateway.reflection
    assert config.expert_cert("c") == CertPair(
        cert_file=str(tmp_path / "c.pem"), key_file=str(tmp_path / "c.key")
    )
    assert config.expert_cert("g") == config.internal_tls
    assert config.gateway_cert() == config.internal_tls
    assert config.tokens_file({}) == str(tmp_path / "tokens")
    assert config.tokens_file({"EXPERTMESH_TOKENS_FILE": "/run/secrets/tokens"}) == "/run/secrets/tokens"


CONFIG_ERRORS = [
    (
        "gateway: {tls: {cert_file: a, key_file: b, cafile: c}}",
        "unknown key 'gateway.tls.cafile' (did you mean 'ca_file'?)",
    ),
    (
        "internal_tls: {ca_file: a, cert_file: b, key_file: c, servername: x}",
        "unknown key 'internal_tls.servername' (did you mean 'server_name'?)",
    ),
    (
        "auth: {tenants: {a: {domain: [code]}}}",
        "unknown key 'auth.tenants.a.domain' (did you mean 'domains'?)",
    ),
    ("auth: {tokenfile: x}", "unknown key 'auth.tokenfile' (did you mean 'tokens_file'?)"),
    (
        "auth: {tenants: {a: {domains: [math]}}}",
        "auth.tenants['a'].domains names 'math': not a domain of this mesh (domains: code)",
    ),
]


@pytest.mark.parametrize(("extra", "message"), CONFIG_ERRORS)
def test_security_config_errors_name_the_key(tmp_path: Path, extra: str, message: str) -> None:
    text = f"{extra}\nexperts: [{{expert_id: c, model_path: /m, domain: code}}]\n"
    with pytest.raises(ConfigError) as e:
        parse_config(text, tmp_path / "mesh.yaml")
    assert message in str(e.value)


def test_plaintext_expert_refuses_a_non_loopback_host() -> None:
    config = mesh(experts=[{"expert_id": "g", "model_path": "/m", "domain": "general", "host": "0.0.0.0"}])
    refusal = insecure_bind_refusal(config, config.experts[0])
    assert refusal is not None and refusal.startswith("expert g would listen on 0.0.0.0 in plaintext")
    assert "allow_insecure: true" in refusal
    insecure = config.model_copy(update={"allow_insecure": True})
    assert insecure_bind_refusal(insecure, config.experts[0]) is None
    local = config.experts[0].model_copy(update={"host": "127.0.0.5"})
    assert insecure_bind_refusal(config, local) is None
    assert [is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "10.0.0.1")] == [
        True,
        True,
        True,
        False,
        False,
    ]


# -- certificates ---------------------------------------------------------------------------


def test_load_pair_checks_the_key_belongs_to_the_certificate(tmp_path: Path) -> None:
    ca = CA(tmp_path)
    a, b = ca.issue("a"), ca.issue("b")
    key, chain = load_pair(CertPair(**a.pair()))
    assert b"BEGIN CERTIFICATE" in chain and b"PRIVATE KEY" in key
    with pytest.raises(TlsError) as e:
        load_pair(CertPair(cert_file=str(a.cert_file), key_file=str(b.key_file)))
    assert str(e.value) == f"{b.key_file} is not the key of the certificate in {a.cert_file}"
    with pytest.raises(TlsError) as e:
        load_pair(CertPair(cert_file=str(a.key_file), key_file=str(a.key_file)))
    assert str(e.value).startswith(f"{a.key_file} is not a PEM certificate")
    with pytest.raises(TlsError) as e:
        load_pair(CertPair(cert_file=str(tmp_path / "none.pem"), key_file=str(a.key_file)))
    assert str(e.value) == f"cannot read {tmp_path / 'none.pem'}: No such file or directory"


async def test_privileged_expert_methods_need_a_peer_certificate() -> None:
    async def unload(request: Any, context: Any) -> str:
        return "unloaded"

    interceptor = RequirePeerCertificate()
    handler = grpc.unary_unary_rpc_method_handler(unload)

    class Details:
        method = "/expertmesh.v1.Expert/Unload"

    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return handler

    guarded = await interceptor.intercept_service(continuation, Details())
    context = FakeContext(auth={"transport_security_type": [b"ssl"]})
    with pytest.raises(Aborted):
        await guarded.unary_unary(pb.UnloadRequest(), context)
    assert context.aborted == (
        grpc.StatusCode.PERMISSION_DENIED,
        "Unload needs a client certificate from the mesh CA (internal_tls)",
    )
    trusted = FakeContext(auth={"x509_pem_cert": [b"-----BEGIN CERTIFICATE-----"]})
    assert await guarded.unary_unary(pb.UnloadRequest(), trusted) == "unloaded"

    class Info:
        method = "/expertmesh.v1.Expert/Info"

    assert await interceptor.intercept_service(continuation, Info()) is handler


async def test_guard_covers_streaming_handlers() -> None:
    async def stream(request: Any, context: Any) -> Any:
        for i in range(3):
            yield i

    checked: list[str] = []

    async def check(context: Any) -> None:
        checked.append("yes")

    guarded = guard(grpc.unary_stream_rpc_method_handler(stream), check)
    assert [i async for i in guarded.unary_stream(None, None)] == [0, 1, 2]
    assert checked == ["yes"]


# -- the tenant on spans and metrics (the real gateway in-process, over a fake expert) --------


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider, set_global=False)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()


async def test_the_tenant_labels_spans_and_metrics_and_reflection_can_be_off(
    tmp_path: Path, spans: InMemorySpanExporter
) -> None:
    expert = FakeExpert("general")
    server, expert_port, _ = await serve_fake(expert)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{TOKEN_A} team_a\n")
    path = tmp_path / "mesh.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "gateway": {
                    "host": "127.0.0.1",
                    "port": free_port(),
                    "reflection": False,
                    "reserved_cores": False,  # in-process: leave the test process's cores alone
                },
                "grace_period_s": 1,
                "auth": {"tokens_file": str(tokens), "tenants": {"team_a": {"max_concurrent_streams": 4}}},
                "experts": [
                    {
                        "expert_id": "general",
                        "domain": "general",
                        "model_path": "/unused",
                        "address": f"127.0.0.1:{expert_port}",
                    }
                ],
            }
        )
    )
    config = load_config(path)
    admitted = REGISTRY.get_sample_value(
        "expertmesh_tenant_admissions_total", {"tenant": "team_a", "outcome": "admitted"}
    )
    charged = REGISTRY.get_sample_value("expertmesh_tenant_tokens_total", {"tenant": "team_a"})
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, path, stop=stop))
    address = f"127.0.0.1:{config.gateway.port}"
    try:
        await wait_serving(address, timeout=30)  # health needs no token
        async with MeshClient(address, timeout=10, token=TOKEN_A) as client:
            result = await client.complete("x", max_tokens=3)
        async with grpc.aio.insecure_channel(address) as channel:
            call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
            with pytest.raises(grpc.aio.AioRpcError) as e:
                _ = [r async for r in call]
            assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED  # gateway.reflection: false
    finally:
        stop.set()
        await task
        await server.stop(0)
    assert result.text == "t0t1t2"
    (request,) = [s for s in spans.get_finished_spans() if s.name == "gateway.generate"]
    assert request.attributes is not None and request.attributes["expertmesh.tenant"] == "team_a"
    labels = {"tenant": "team_a", "outcome": "admitted"}
    assert REGISTRY.get_sample_value("expertmesh_tenant_admissions_total", labels) == (admitted or 0) + 1
    assert (
        REGISTRY.get_sample_value("expertmesh_tenant_tokens_total", {"tenant": "team_a"})
        == (charged or 0) + 5
    )
    assert REGISTRY.get_sample_value("expertmesh_tenant_streams_in_flight", {"tenant": "team_a"}) == 0


def test_the_client_never_sends_a_token_in_plaintext_off_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    from expertmesh.client import Security

    assert Security(token=TOKEN_A).metadata("127.0.0.1:8080") == (("authorization", f"Bearer {TOKEN_A}"),)
    assert Security(token=TOKEN_A).metadata("localhost:8080")
    assert Security(token=TOKEN_A, tls=True).metadata("gw.example:443")
    with pytest.raises(TlsError) as e:
        Security(token=TOKEN_A).metadata("10.0.0.5:8080")
    assert str(e.value) == (
        "refusing to send a bearer token in plaintext to 10.0.0.5:8080: use TLS (--cacert or --tls)"
    )
    monkeypatch.setenv("EXPERTMESH_TOKEN", TOKEN_B)
    assert Security().metadata("127.0.0.1:8080") == (("authorization", f"Bearer {TOKEN_B}"),)
    assert Security(token="").metadata("10.0.0.5:8080") == ()  # an explicit "" sends none


def test_preflight_names_every_security_problem_at_once(tmp_path: Path) -> None:
    from expertmesh.preflight.security import check_expert_security, check_mesh_security

    ca = CA(tmp_path)
    good, other = ca.issue("good"), ca.issue("other")
    mismatched = {"cert_file": str(other.cert_file), "key_file": str(good.key_file)}
    (tmp_path / "tokens").write_text(f"{TOKEN_A} nobody\n")
    config = mesh(
        gateway={"tls": {"cert_file": str(good.cert_file), "key_file": str(other.key_file)}},
        internal_tls={"ca_file": str(tmp_path / "missing.pem"), **good.pair()},
        auth={"tokens_file": str(tmp_path / "tokens")},
        experts=[
            {"expert_id": "g", "model_path": "/m", "domain": "general", "host": "0.0.0.0"},
            {"expert_id": "c", "model_path": "/m", "domain": "code", "internal_cert": mismatched},
        ],
    )
    mesh_codes = [(f.severity, f.code) for f in check_mesh_security(config)]
    assert mesh_codes == [("error", "tls-gateway-cert"), ("error", "tls-mesh-ca"), ("error", "tokens-file")]
    assert [f.code for f in check_expert_security(config, "g")] == []  # internal_tls: 0.0.0.0 is fine
    (mismatch,) = check_expert_security(config, "c")
    assert (
        mismatch.cause
        == f"expert c certificate: {good.key_file} is not the key of the certificate in {other.cert_file}"
    )
    plaintext = mesh(experts=[{"expert_id": "g", "model_path": "/m", "domain": "general", "host": "0.0.0.0"}])
    (refusal,) = check_expert_security(plaintext, "g")
    assert refusal.code == "insecure-listen" and refusal.severity == "error"
    assert check_mesh_security(plaintext) == []


def test_link_security_checks_the_configured_server_name(tmp_path: Path) -> None:
    from expertmesh.tls import link_security

    ca = CA(tmp_path)
    pair = ca.issue("gateway-link").pair()
    credentials, options = link_security(mesh(internal_tls={"ca_file": str(ca.file), **pair}))
    assert credentials is not None and options == []  # the host dialled is the name checked
    named = mesh(internal_tls={"ca_file": str(ca.file), **pair, "server_name": "experts.mesh"})
    assert link_security(named)[1] == [("grpc.ssl_target_name_override", "experts.mesh")]
    assert link_security(mesh()) == (None, [])
