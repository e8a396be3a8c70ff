"""Security with real processes: TLS for callers (mTLS), mTLS between gateway and expert, tokens,
tenants, and rotation of tokens and certificates without a restart.

One expert process (one engine, general_tiny) under internal_tls, and a gateway process with TLS,
client certificates from a callers' CA, and a tokens file. A second expert (code_tiny) is in the
config but never started: the tenant tests only need its domain to exist. The tests run in file
order; the certificate rotation is last because it changes what clients must trust.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expertmesh import procs
from expertmesh.bench.pki import CA, Issued
from expertmesh.client import MeshClient
from expertmesh.config import MeshConfig, load_config
from expertmesh.tls import client_credentials
from expertmesh.v1 import expertmesh_pb2 as pb
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from ..expert_support import start_expert, start_gateway, stop_group
from ..support import GRPCURL, VENV_BIN, demo_expert, free_port, write_config

pytestmark = pytest.mark.engine

OPS = "ops-" + "o" * 28  # tenant default: unrestricted
CODERS = "coders-" + "c" * 25  # tenant coders: domain code only
METERED = "metered-" + "m" * 24  # tenant metered: a small token rate
ROTATED = "rotated-" + "r" * 24
#: The metered tenant's window and budget: 40 tokens per 3 s (tokens_per_minute 800).
WINDOW_S = 3.0
TOKENS_PER_MINUTE = 800


@dataclass
class Pki:
    mesh: CA
    callers: CA
    rogue: CA
    gateway: Issued  # the gateway's certificate for callers
    gateway_link: Issued  # the gateway's client certificate towards experts
    expert: Issued
    caller: Issued
    rogue_caller: Issued


@dataclass
class SecureMesh:
    config: MeshConfig
    pki: Pki
    folder: Path
    tokens_file: Path
    expert_proc: subprocess.Popen[bytes]
    gateway_proc: subprocess.Popen[bytes]

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.config.gateway.port}"

    @property
    def expert(self) -> str:
        return self.config.expert_address(0)

    def client(self, token: str | None = None, **kwargs: object) -> MeshClient:
        """A caller with the callers' certificate, trusting the mesh CA."""
        p = self.pki
        return MeshClient(
            self.gateway,
            timeout=60,
            cacert=str(p.mesh.file),
            cert=str(p.caller.cert_file),
            key=str(p.caller.key_file),
            token=token or "",
            **kwargs,  # type: ignore[arg-type]
        )

    def caller_credentials(self) -> grpc.ChannelCredentials:
        p = self.pki
        return client_credentials(str(p.mesh.file), str(p.caller.cert_file), str(p.caller.key_file))

    def link_credentials(self) -> grpc.ChannelCredentials:
        """What the gateway shows experts: a certificate from the mesh CA."""
        p = self.pki
        return client_credentials(
            str(p.mesh.file), str(p.gateway_link.cert_file), str(p.gateway_link.key_file)
        )


def make_pki(folder: Path) -> Pki:
    mesh, callers, rogue = CA(folder, "mesh"), CA(folder, "callers"), CA(folder, "rogue")
    return Pki(
        mesh,
        callers,
        rogue,
        gateway=mesh.issue("gateway"),
        gateway_link=mesh.issue("gateway-link"),
        expert=mesh.issue("expert"),
        caller=callers.issue("caller"),
        rogue_caller=rogue.issue("rogue-caller"),
    )


async def health(address: str, credentials: grpc.ChannelCredentials | None, timeout: float = 2.0) -> str:
    """grpc.health.v1 status at ``address`` (TLS with ``credentials``), or the failure's code name."""
    channel = (
        grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)
    )
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout
            )
        except grpc.aio.AioRpcError as e:
            return e.code().name
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


async def wait_health(address: str, credentials: grpc.ChannelCredentials, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await health(address, credentials) == "SERVING":
            return
        await asyncio.sleep(0.25)
    raise TimeoutError(f"{address} not SERVING after {timeout} s")


def json_stream(text: str) -> list[dict[str, object]]:
    """grpcurl's output: one JSON object per streamed message, one after the other."""
    decoder, found, at = json.JSONDecoder(), [], 0
    while text[at:].strip():
        at += len(text[at:]) - len(text[at:].lstrip())
        obj, at = decoder.raw_decode(text, at)
        found.append(obj)
    return found


def write_tokens(path: Path, *lines: str) -> None:
    """Replace the tokens file in one step (as a Secret update does), with a new mtime."""
    tmp = path.with_suffix(".new")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, demo_models: list[Path]) -> Iterator[SecureMesh]:
    folder = tmp_path_factory.mktemp("security")
    pki = make_pki(folder)
    tokens = folder / "tokens"
    write_tokens(tokens, OPS, f"{CODERS} coders", f"{METERED} metered")
    # The gateway's certificate pair lives under names the rotation test can overwrite.
    shutil.copy(pki.gateway.cert_file, folder / "live-gateway.pem")
    shutil.copy(pki.gateway.key_file, folder / "live-gateway.key")
    path = write_config(
        folder / "mesh.yaml",
        [
            demo_expert("general_tiny", "general", internal_cert=pki.expert.pair()),
            demo_expert("code_tiny", "code", "demo-code"),  # never started
        ],
        gateway={
            "host": "127.0.0.1",
            "port": free_port(),
            "metrics_port": free_port(),
            "tls": {
                "cert_file": str(folder / "live-gateway.pem"),
                "key_file": str(folder / "live-gateway.key"),
                "client_ca_file": str(pki.callers.file),
            },
        },
        internal_tls={"ca_file": str(pki.mesh.file), **pki.gateway_link.pair()},
        auth={
            "tokens_file": str(tokens),
            "rate_window_s": WINDOW_S,
            "tenants": {
                "coders": {"domains": ["code"]},
                "metered": {"domains": ["general"], "tokens_per_minute": TOKENS_PER_MINUTE},
            },
        },
    )
    config = load_config(path)
    logs = folder / "logs"
    expert = start_expert(path, "general_tiny", logs)
    gateway = start_gateway(path, logs / "gateway.log")
    mesh = SecureMesh(config, pki, folder, tokens, expert, gateway)
    try:
        asyncio.run(wait_health(mesh.expert, mesh.link_credentials()))
        asyncio.run(wait_health(mesh.gateway, mesh.caller_credentials(), timeout=60))
        yield mesh
    finally:
        stop_group(gateway)
        stop_group(expert)


# -- TLS for callers ------------------------------------------------------------------------


async def test_plaintext_and_other_cas_fail_at_the_handshake(secure: SecureMesh) -> None:
    p = secure.pki
    assert await health(secure.gateway, None) == "UNAVAILABLE"  # plaintext to a TLS port
    # trusting another CA: the gateway's certificate does not verify
    rogue_trust = client_credentials(str(p.rogue.file), str(p.caller.cert_file), str(p.caller.key_file))
    assert await health(secure.gateway, rogue_trust) == "UNAVAILABLE"
    # a client certificate from another CA, and none at all: the gateway refuses the caller
    rogue_cert = client_credentials(
        str(p.mesh.file), str(p.rogue_caller.cert_file), str(p.rogue_caller.key_file)
    )
    assert await health(secure.gateway, rogue_cert) == "UNAVAILABLE"
    assert await health(secure.gateway, client_credentials(str(p.mesh.file))) == "UNAVAILABLE"
    # the right CA and a caller certificate: health answers, without a token
    assert await health(secure.gateway, secure.caller_credentials()) == "SERVING"


def test_grpcurl_as_an_operator_types_it(secure: SecureMesh) -> None:
    p = secure.pki
    tls = ["-cacert", str(p.mesh.file), "-cert", str(p.caller.cert_file), "-key", str(p.caller.key_file)]

    def grpcurl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run([GRPCURL, *args], capture_output=True, text=True, check=check, timeout=60)

    request = '{"prompt": "hello", "sampling": {"max_tokens": 4, "temperature": 0}}'
    out = grpcurl(*tls, "-H", f"authorization: Bearer {OPS}", "-d", request, secure.gateway,
                  "expertmesh.v1.Gateway/Generate").stdout  # fmt: skip
    messages = json_stream(out)
    assert messages[-1].get("finish_reason") == "length", out
    assert messages[-1]["usage"]["completion_tokens"] == 4
    assert messages[0]["expert_id"] == "general_tiny"
    # health and reflection need no token
    assert json.loads(grpcurl(*tls, secure.gateway, "grpc.health.v1.Health/Check").stdout) == {
        "status": "SERVING"
    }
    # no token: refused, and the message names no token
    refused = grpcurl(*tls, "-d", request, secure.gateway, "expertmesh.v1.Gateway/Generate", check=False)
    assert refused.returncode != 0
    assert "Code: Unauthenticated" in refused.stderr
    assert "Message: this gateway needs 'authorization: Bearer <token>' metadata" in refused.stderr
    # plaintext: refused at the handshake
    plain = grpcurl("-plaintext", secure.gateway, "grpc.health.v1.Health/Check", check=False)
    assert plain.returncode != 0


def test_cli_generate_and_experts_over_tls_with_a_token(secure: SecureMesh) -> None:
    p = secure.pki
    tls = ["--gateway", secure.gateway, "--cacert", str(p.mesh.file)]
    tls += ["--cert", str(p.caller.cert_file), "--key", str(p.caller.key_file)]
    cli = str(VENV_BIN / "expertmesh")
    env = {**os.environ, "EXPERTMESH_TOKEN": OPS}
    generated = subprocess.run(
        [cli, "generate", "hello", "--max-tokens", "4", "--timeout", "30", *tls],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert generated.returncode == 0, generated.stderr
    assert "[general_tiny] finish_reason=length prompt_tokens=" in generated.stderr
    listed = subprocess.run(
        [cli, "experts", *tls, "--token", OPS], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr
    assert "general_tiny" in listed.stdout and "code_tiny" in listed.stdout
    refused = subprocess.run(
        [cli, "generate", "hello", *tls, "--token", "wrong-" + "w" * 26],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1
    assert refused.stderr.strip() == "error: UNAUTHENTICATED: the bearer token is not valid"


# -- mTLS inside the mesh -------------------------------------------------------------------


async def test_expert_refuses_callers_without_a_mesh_certificate(secure: SecureMesh) -> None:
    p = secure.pki
    for credentials in (
        None,  # plaintext
        client_credentials(str(p.mesh.file)),  # TLS, no client certificate
        client_credentials(str(p.mesh.file), str(p.rogue_caller.cert_file), str(p.rogue_caller.key_file)),
    ):
        channel = (
            grpc.aio.secure_channel(secure.expert, credentials)
            if credentials
            else grpc.aio.insecure_channel(secure.expert)
        )
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await pb_grpc.ExpertStub(channel).Unload(pb.UnloadRequest(reason="attacker"), timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    # ... and still serves: its engine is loaded, and the gateway (a mesh certificate) reaches it
    async with grpc.aio.secure_channel(secure.expert, secure.link_credentials()) as channel:
        info = await pb_grpc.ExpertStub(channel).Info(pb.InfoRequest(), timeout=5)
    assert info.state == pb.EXPERT_STATE_READY
    assert info.unload_reason == ""
    async with secure.client(OPS) as client:
        result = await client.complete("hello", max_tokens=4, temperature=0)
    assert (result.expert_id, result.completion_tokens) == ("general_tiny", 4)


def test_plaintext_expert_on_a_public_host_refuses_to_start(secure: SecureMesh) -> None:
    """Without internal_tls an expert does not listen on 0.0.0.0 unless allow_insecure says so."""
    path = write_config(secure.folder / "open.yaml", [demo_expert("open_tiny", "general", host="0.0.0.0")])
    proc = start_expert(path, "open_tiny", secure.folder / "logs")
    try:
        assert proc.wait(120) == 2
    finally:
        stop_group(proc)
    log = (secure.folder / "logs" / "open_tiny.log").read_text()
    assert "expert open_tiny would listen on 0.0.0.0 in plaintext" in log
    assert "set allow_insecure: true to accept the risk" in log


# -- tokens and tenants ---------------------------------------------------------------------


async def test_missing_or_wrong_token_is_unauthenticated(secure: SecureMesh) -> None:
    for token, details in (
        ("", "this gateway needs 'authorization: Bearer <token>' metadata"),
        ("wrong-" + "w" * 26, "the bearer token is not valid"),
    ):
        async with secure.client(token) as client:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.complete("hello", max_tokens=2)
            assert (e.value.code(), e.value.details()) == (grpc.StatusCode.UNAUTHENTICATED, details)
            with pytest.raises(grpc.aio.AioRpcError) as e:  # no addresses for strangers
                await client.list_experts()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    async with secure.client(OPS) as client:
        listed = await client.list_experts()
    assert [e.address for e in listed.experts] == [secure.expert, secure.config.expert_address(1)]


async def test_tenant_outside_its_domains_is_permission_denied(secure: SecureMesh) -> None:
    async with secure.client(CODERS) as client:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.complete("hello", domain="general", max_tokens=2)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details() == "tenant coders may not use domain 'general'; its domains: code"
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.complete("hello", expert_id="general_tiny", max_tokens=2)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details() == (
            "tenant coders may not use expert 'general_tiny' (domain 'general'); its domains: code"
        )
        listed = await client.list_experts()  # a tenant sees its own domains' experts only
    assert [e.expert_id for e in listed.experts] == ["code_tiny"]


def _metric(secure: SecureMesh, name: str, **labels: str) -> float:
    port = secure.config.gateway.metrics_port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_tenant_over_its_token_rate_is_resource_exhausted_then_served_again(secure: SecureMesh) -> None:
    budget = int(TOKENS_PER_MINUTE * WINDOW_S / 60)  # 40 tokens per 3 s
    async with secure.client(METERED) as client:
        first = await client.complete("hello", max_tokens=30, ignore_eos=True)  # reserves 30 of 40
        used = first.prompt_tokens + first.completion_tokens
        assert first.completion_tokens == 30 and used + 30 > budget
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.complete("hello", max_tokens=30, ignore_eos=True)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert e.value.details() == (
            f"tenant metered is over its token rate: {used} of {budget} tokens used or reserved in the "
            f"last {WINDOW_S:g} s (tokens_per_minute {TOKENS_PER_MINUTE}), this request reserves 30"
        )
        trailing = dict(e.value.trailing_metadata() or ())
        pushback_s = int(trailing["grpc-retry-pushback-ms"]) / 1000
        assert 0 < pushback_s <= WINDOW_S
        # The server said when the window has room again: wait that long, and it serves.
        await asyncio.sleep(max(pushback_s - (time.monotonic() - started), 0) + 0.05)
        again = await client.complete("hello", max_tokens=30, ignore_eos=True)
    assert again.completion_tokens == 30
    assert _metric(secure, "expertmesh_tenant_admissions_total", tenant="metered", outcome="tokens") >= 1
    assert (
        _metric(secure, "expertmesh_tenant_tokens_total", tenant="metered") == used + again.prompt_tokens + 30
    )


async def test_rotating_the_tokens_file_keeps_streams_in_flight(secure: SecureMesh) -> None:
    async with secure.client(OPS) as old, secure.client(ROTATED) as new:
        # long enough (~900 tokens) to be still generating while the file changes
        stream = old.stream("hello", max_tokens=900, ignore_eos=True, temperature=0)
        first = await anext(stream)  # a stream in flight under the old token
        write_tokens(secure.tokens_file, ROTATED, f"{CODERS} coders", f"{METERED} metered")
        rotated_at = time.monotonic()
        old_refused = new_accepted = None
        while time.monotonic() - rotated_at < 5 and not (old_refused and new_accepted):
            try:
                await old.list_experts(timeout=2)
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                old_refused = old_refused or time.monotonic() - rotated_at
            try:
                await new.list_experts(timeout=2)
                new_accepted = new_accepted or time.monotonic() - rotated_at
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED
            await asyncio.sleep(0.1)
        print(f"\nold token refused after {old_refused} s, new accepted after {new_accepted} s")
        assert old_refused is not None and new_accepted is not None
        rest = [m async for m in stream]  # the stream begun under the old token runs to its end
        print(f"the stream begun before the rotation ended {time.monotonic() - rotated_at:.2f} s after it")
    assert rest[-1].finish_reason == "length"
    assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 900
    write_tokens(secure.tokens_file, OPS, f"{CODERS} coders", f"{METERED} metered")  # for the next test


async def test_rotating_the_gateway_certificate_without_a_restart(secure: SecureMesh) -> None:
    """New connections get the new pair within a few seconds; a broken pair is refused, not used."""
    p = secure.pki
    live_cert, live_key = secure.folder / "live-gateway.pem", secure.folder / "live-gateway.key"
    live_cert.write_text("not a certificate\n")  # a half-written or broken file: the old pair stays
    log_file = secure.folder / "logs" / "gateway.log"
    broken_at = time.monotonic()
    while "certificate reload rejected, keeping the running certificate" not in log_file.read_text():
        # each check is a new handshake, which is when the gateway looks at the files (<= 1/s)
        assert await health(secure.gateway, secure.caller_credentials()) == "SERVING"
        assert time.monotonic() - broken_at < 5, "the broken certificate was not noticed within 5 s"
    assert await health(secure.gateway, secure.caller_credentials()) == "SERVING"
    other = CA(secure.folder, "next")
    issued = other.issue("gateway-next")
    shutil.copy(issued.key_file, live_key)
    shutil.copy(issued.cert_file, live_cert)
    trusting_next = client_credentials(str(other.file), str(p.caller.cert_file), str(p.caller.key_file))
    rotated_at = time.monotonic()
    while await health(secure.gateway, trusting_next) != "SERVING":
        assert time.monotonic() - rotated_at < 5, "the new certificate was not picked up within 5 s"
        await asyncio.sleep(0.2)
    print(f"\nnew certificate served after {time.monotonic() - rotated_at:.2f} s")
    assert await health(secure.gateway, secure.caller_credentials()) == "UNAVAILABLE"  # the old CA no longer
    assert "PRIVATE KEY" not in log_file.read_text()  # the log names files, never key material


def test_up_runs_a_tls_mesh_and_sees_it_ready(secure: SecureMesh) -> None:
    """`expertmesh up` checks every process's health over its TLS (a lazy expert: no engine)."""
    p = secure.pki
    path = write_config(
        secure.folder / "up.yaml",
        [demo_expert("lazy_tiny", "general", load="lazy", internal_cert=p.expert.pair())],
        max_restarts=0,
        gateway={
            "host": "127.0.0.1",
            "port": free_port(),
            "tls": {**p.gateway.pair(), "ca_file": str(p.mesh.file)},
        },
        internal_tls={"ca_file": str(p.mesh.file), **p.gateway_link.pair()},
        auth={"tokens_file": str(secure.tokens_file), "tenants": {"coders": {}, "metered": {}}},
    )
    config = load_config(path)
    proc = procs.spawn(
        [
            str(VENV_BIN / "expertmesh"),
            "up",
            "--config",
            str(path),
            "--log-dir",
            str(secure.folder / "up-logs"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:  # the supervisor's own report, as an operator sees it
            lines.append(line)
            if "mesh ready" in line or "exited with code" in line:
                break
        assert "mesh ready: gateway at" in lines[-1], "".join(lines)
        assert any(f"lazy_tiny: SERVING at {config.expert_address(0)}" in line for line in lines)

        async def listed() -> pb.ListExpertsResponse:
            async with MeshClient(
                f"127.0.0.1:{config.gateway.port}", timeout=10, cacert=str(p.mesh.file), token=OPS
            ) as client:
                return await client.list_experts()

        (expert,) = asyncio.run(listed()).experts
        assert (expert.expert_id, expert.health, expert.state) == (
            "lazy_tiny",
            "SERVING",
            pb.EXPERT_STATE_COLD,
        )
    finally:
        stop_group(proc)


async def test_rotating_the_gateways_link_certificate_renews_its_links(secure: SecureMesh) -> None:
    """The gateway's certificate towards experts is re-read too: one the experts' CA did not
    issue takes the experts out of rotation within seconds, a good one brings them back."""
    p = secure.pki
    # The gateway's own certificate comes from the "next" CA since the test above.
    bundle = secure.folder / "callers-trust.pem"
    bundle.write_bytes(p.mesh.file.read_bytes() + (secure.folder / "next-ca.pem").read_bytes())
    caller = client_credentials(str(bundle), str(p.caller.cert_file), str(p.caller.key_file))
    assert await health(secure.gateway, caller) == "SERVING"

    def install(issued: Issued) -> float:
        shutil.copy(issued.key_file, p.gateway_link.key_file)
        shutil.copy(issued.cert_file, p.gateway_link.cert_file)
        return time.monotonic()

    async def wait_for(status: str, since: float) -> float:
        while await health(secure.gateway, caller) != status:
            assert time.monotonic() - since < 5, f"the gateway's health did not turn {status} within 5 s"
            await asyncio.sleep(0.2)
        return time.monotonic() - since

    good = p.gateway_link
    saved = (good.cert_file.read_bytes(), good.key_file.read_bytes())
    try:
        down = await wait_for("NOT_SERVING", install(p.rogue.issue("rogue-link")))
        up = await wait_for("SERVING", install(p.mesh.issue("next-link")))
        print(f"\nlink certificate from another CA: NOT_SERVING after {down:.2f} s; ", end="")
        print(f"a good one: SERVING after {up:.2f} s")
    finally:
        good.cert_file.write_bytes(saved[0])
        good.key_file.write_bytes(saved[1])
    async with MeshClient(secure.gateway, timeout=60, cacert=str(bundle), cert=str(p.caller.cert_file),
                          key=str(p.caller.key_file), token=OPS) as client:  # fmt: skip
        result = await client.complete("hello", max_tokens=4)
    assert result.completion_tokens == 4
    log = (secure.folder / "logs" / "gateway.log").read_text()
    assert log.count("link certificates changed: renewing the links to every expert") >= 2
