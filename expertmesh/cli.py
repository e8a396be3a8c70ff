"""The ``expertmesh`` command: run the mesh, talk to it, build the demo models."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from expertmesh.client import DEFAULT_TARGET, TOKEN_ENV, MeshClient
from expertmesh.config import ConfigError, MeshConfig, load_resolved
from expertmesh.logs import setup_logging
from expertmesh.rpc import stop_event_on_signals
from expertmesh.supervisor import Supervisor
from expertmesh.tls import TlsError
from expertmesh.v1 import expertmesh_pb2 as pb

CONFIG_HELP = "mesh config file (env: EXPERTMESH_CONFIG, legacy VLLM_CONFIG_PATH; default configs/demo.yaml)"
GATEWAY_HELP = f"gateway address (env: EXPERTMESH_GATEWAY; default {DEFAULT_TARGET})"


def _say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _log_dir(arg: str | None) -> Path:
    return Path(arg) if arg else Path(tempfile.mkdtemp(prefix="expertmesh-logs-"))


def _settled_line(sup: Supervisor) -> str:
    """One line on the mesh once every process has loaded or failed."""
    failed = sup.failures()
    if not failed:
        return f"mesh ready: gateway at {sup.gateway.address}"
    names = ", ".join(c.name for c in failed)
    serving = sum(c.health == "SERVING" for c in sup.experts)
    return (
        f"mesh up with failures: {serving} of {len(sup.experts)} experts SERVING, FAILED: {names}; "
        f"gateway at {sup.gateway.address}"
    )


async def _up(config: MeshConfig, config_path: Path, log_dir: Path, exit_on_failure: bool = False) -> int:
    stop = stop_event_on_signals()
    sup = Supervisor(config, config_path, log_dir, _say)
    await sup.start()
    asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, sup.reload)
    preflight = asyncio.create_task(sup.preflight())  # alongside the loads, which take longer
    code = 0
    try:
        settled = asyncio.create_task(sup.wait_settled())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({settled, stopped}, return_when=asyncio.FIRST_COMPLETED)
        settled.cancel()
        if not stop.is_set():
            if exit_on_failure and sup.failures():
                _say(_settled_line(sup))
                _say("stopping: some experts failed (--exit-on-failure)")
                code = 1
                stop.set()
            else:
                _say(f"{_settled_line(sup)}; Ctrl-C to stop")
        await stop.wait()
        _say("stopping ...")
    finally:
        preflight.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await preflight
        await sup.stop()
    return code


def _security(args: argparse.Namespace) -> dict[str, Any]:
    """MeshClient's TLS and token arguments from the command line."""
    return {"cacert": args.cacert, "cert": args.cert, "key": args.key, "token": args.token, "tls": args.tls}


async def _stream(target: str, args: argparse.Namespace) -> int:
    async with MeshClient(target, timeout=args.timeout, **_security(args)) as mesh:
        last: pb.GenerateResponse | None = None
        async for msg in mesh.stream(
            args.prompt,
            domain=args.domain or "",
            expert_id=args.expert_id or "",
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed,
        ):
            print(msg.text, end="", flush=True)
            last = msg
        print()
        if last is not None:
            print(
                f"[{last.expert_id}] finish_reason={last.finish_reason} "
                f"prompt_tokens={last.usage.prompt_tokens} completion_tokens={last.usage.completion_tokens}",
                file=sys.stderr,
            )
    return 0


async def _list(target: str, args: argparse.Namespace) -> int:
    """Print the gateway's experts; exit 1 (with the cause) when the gateway does not answer."""
    from google.protobuf.json_format import MessageToDict
    from rich.table import Table

    from expertmesh.console import console

    try:
        async with MeshClient(target, timeout=args.timeout, **_security(args)) as mesh:
            reply = await mesh.list_experts()
    except grpc.aio.AioRpcError as err:
        cause = f"{err.code().name}: {err.details()}"
        print(f"error: the gateway at {target} did not answer: {cause}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(MessageToDict(reply, preserving_proto_field_name=True), indent=2))
        return 0
    table = Table("expert_id", "domain", "address", "health", "state", "last_error")
    for e in reply.experts:
        state = pb.ExpertState.Name(e.state).removeprefix("EXPERT_STATE_")
        table.add_row(e.expert_id, e.domain, e.address, e.health, state, e.last_error)
    console().print(table)
    print(f"default domain: {reply.default_domain}")
    return 0


#: The demo's question per domain (other domains get the general one).
DEMO_QUESTIONS = {
    "general": "What does a CPU do? Answer in two sentences.",
    "code": "Write a Python function that reverses a string.",
}
#: How long the demo waits for every expert to load or fail.
DEMO_READY_TIMEOUT_S = 600.0


async def _demo(config: MeshConfig, config_path: Path, log_dir: Path) -> int:
    """Start the mesh, ask one question per domain through the gateway, print the answers, stop."""
    sup = Supervisor(config, config_path, log_dir, _say)
    started = time.monotonic()
    await sup.start()
    try:
        try:
            await asyncio.wait_for(sup.wait_settled(), DEMO_READY_TIMEOUT_S)
        except TimeoutError:
            _say(f"the mesh was not ready after {DEMO_READY_TIMEOUT_S:.0f} s; see the logs above")
            return 1
        if sup.failures():
            _say(f"{_settled_line(sup)}; the causes are above")
            return 1
        _say(f"all experts SERVING after {time.monotonic() - started:.1f} s")
        async with MeshClient(sup.gateway.address, timeout=300) as mesh:
            for domain in config.domains():
                question = DEMO_QUESTIONS.get(domain, DEMO_QUESTIONS["general"])
                print(f"\n--- domain={domain}: {question}", flush=True)
                first = None
                t0 = time.monotonic()
                result = None
                # The model's own sampling defaults (generation_config.json) and max_tokens; a
                # fixed seed so that the demo answers alike every time.
                async for msg in mesh.stream(messages=[("user", question)], domain=domain, seed=0):
                    first = first or time.monotonic() - t0
                    print(msg.text, end="", flush=True)
                    result = msg
                assert result is not None
                took = time.monotonic() - t0
                print(
                    f"\n--- served by {result.expert_id}: finish_reason={result.finish_reason}, "
                    f"{result.usage.completion_tokens} tokens in {took:.1f} s, "
                    f"first token after {1000 * (first or 0):.0f} ms",
                    flush=True,
                )
    finally:
        await sup.stop()
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("expertmesh")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


async def _health(args: argparse.Namespace) -> int:
    """One grpc.health.v1 Check over TLS: the probe for pods whose ports speak only TLS."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from expertmesh.rpc import open_channel
    from expertmesh.tls import client_credentials

    if args.cacert or args.cert or args.tls:
        options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
        channel = open_channel(args.address, client_credentials(args.cacert, args.cert, args.key), options)
    else:
        channel = open_channel(args.address)
    async with channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
        )
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if status == "SERVING" else 1


def _positive(text: str) -> int:
    """argparse type: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _client_security(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cacert", help="PEM CA that issued the gateway's certificate (implies TLS)")
    parser.add_argument("--cert", help="PEM client certificate, for a gateway that requires one")
    parser.add_argument("--key", help="PEM private key of --cert")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's CAs")
    parser.add_argument("--token", help=f"bearer token (env: {TOKEN_ENV})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertmesh", description="A gRPC mesh of vLLM experts.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up", help="start the gateway and every expert; Ctrl-C / SIGTERM stops all, SIGHUP reloads the config"
    )
    up.add_argument("--config", help=CONFIG_HELP)
    up.add_argument("--log-dir", help="where each process writes its log (default: a new temp folder)")
    up.add_argument(
        "--exit-on-failure",
        action="store_true",
        help="once every expert has loaded or failed, stop everything and exit 1 if any failed",
    )

    demo = sub.add_parser(
        "demo", help="build the demo models if missing, start the mesh, stream answers, stop"
    )
    demo.add_argument("--config", help=CONFIG_HELP)
    demo.add_argument("--log-dir", help="where each process writes its log (default: a new temp folder)")

    gen = sub.add_parser("generate", help="stream a completion through the gateway to the terminal")
    gen.add_argument("prompt")
    gen.add_argument(
        "--gateway", default=os.environ.get("EXPERTMESH_GATEWAY", DEFAULT_TARGET), help=GATEWAY_HELP
    )
    gen.add_argument("--domain", help="route to this domain")
    gen.add_argument("--expert-id", help="pin this expert")
    gen.add_argument("--max-tokens", type=int)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--timeout", type=float, help="deadline in seconds")
    _client_security(gen)

    ls = sub.add_parser("experts", help="list the experts with their health and state")
    ls.add_argument(
        "--gateway", default=os.environ.get("EXPERTMESH_GATEWAY", DEFAULT_TARGET), help=GATEWAY_HELP
    )
    ls.add_argument("--json", action="store_true", help="machine-readable output (ListExperts as JSON)")
    ls.add_argument("--timeout", type=float, default=5.0, help="deadline in seconds (default 5)")
    _client_security(ls)

    health = sub.add_parser("health", help="check grpc.health.v1 at an address (TLS too); exit 0 if SERVING")
    health.add_argument("address", help="host:port")
    health.add_argument("--service", default="", help="service name (default: the server as a whole)")
    health.add_argument("--timeout", type=float, default=3.0, help="deadline in seconds (default 3)")
    health.add_argument("--cacert", help="PEM CA that issued the server's certificate (implies TLS)")
    health.add_argument("--cert", help="PEM client certificate, for a server that requires one")
    health.add_argument("--key", help="PEM private key of --cert")
    health.add_argument("--tls", action="store_true", help="TLS with the system's CAs")
    health.add_argument("--server-name", help="name to check in the server's certificate (default: the host)")

    check = sub.add_parser("check", help="preflight: find every config and model problem before loading")
    check.add_argument("--config", help=CONFIG_HELP)
    check.add_argument("--json", action="store_true", help="machine-readable output")

    probe = sub.add_parser("probe", help="per expert: cold load time, warm time to first token, tokens/s")
    probe.add_argument("--config", help=CONFIG_HELP)
    probe.add_argument("--requests", type=int, default=5, help="warm requests per expert")

    bench = sub.add_parser("bench", help="benchmark the mesh against in-process vLLM and vLLM's servers")
    bench.add_argument("--quick", action="store_true", help="a few requests per scenario (smoke size)")
    bench.add_argument("--out", default="bench-results", help="folder for results.json and results.png")
    bench.add_argument(
        "--trials", type=_positive, help="trials per level, the best reported (default: 4, --quick 1)"
    )
    bench.add_argument(
        "--only",
        help="comma-separated scenarios: run just their groups, in turns (e.g. gateway,gateway_tls)",
    )
    bench.add_argument(
        "--config", help="mesh the up_* scenarios start with expertmesh up (default: configs/demo.yaml)"
    )

    deploy = sub.add_parser("deploy", help="render deployment files from the mesh config")
    target = deploy.add_subparsers(dest="target", required=True)
    k8s = target.add_parser("k8s", help="a kustomize base and cpu/gpu overlays for Kubernetes")
    k8s.add_argument("--config", help=CONFIG_HELP)
    k8s.add_argument("--out", required=True, help="folder to write base/ and overlays/ into")
    k8s.add_argument("--namespace", default="expertmesh", help="namespace (default expertmesh)")
    k8s.add_argument(
        "--plaintext",
        action="store_true",
        help="no TLS, tokens or Secrets inside the cluster (native gRPC probes); default: mTLS from Secrets",
    )

    build = sub.add_parser(
        "build-demo-models", help="build the demo models (the real instruct one, the tiny ones) into .models/"
    )
    build.add_argument("--out", help="folder (default: .models/ at the repository root)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``expertmesh`` command."""
    args = _parser().parse_args(argv)
    setup_logging("WARNING" if args.command in ("generate", "experts", "health") else None)
    try:
        if args.command in ("up", "demo"):
            config, source = load_resolved(args.config)
            if args.command == "demo":
                from expertmesh.demo_models import ensure_real_model

                ensure_real_model()
                return asyncio.run(_demo(config, source.path, _log_dir(args.log_dir)))
            return asyncio.run(_up(config, source.path, _log_dir(args.log_dir), args.exit_on_failure))
        if args.command == "generate":
            return asyncio.run(_stream(args.gateway, args))
        if args.command == "experts":
            return asyncio.run(_list(args.gateway, args))
        if args.command == "health":
            return asyncio.run(_health(args))
        if args.command == "check":
            from expertmesh.preflight import main_check

            return main_check(args.config, as_json=args.json)
        if args.command == "probe":
            from expertmesh.probe import main_probe

            return main_probe(args.config, requests=args.requests)
        if args.command == "bench":
            from expertmesh.bench.command import main_bench

            only = set(args.only.split(",")) if args.only else None
            mesh_path = Path(args.config) if args.config else None
            return main_bench(
                quick=args.quick, out=Path(args.out), trials=args.trials, only=only, config=mesh_path
            )
        if args.command == "deploy":
            from expertmesh.deploy.render import main_deploy_k8s

            return main_deploy_k8s(args.config, Path(args.out), args.namespace, tls=not args.plaintext)
        if args.command == "build-demo-models":
            from expertmesh.demo_models import DEFAULT_MODELS_DIR, ensure_demo_models, ensure_real_model

            out = Path(args.out) if args.out else DEFAULT_MODELS_DIR
            ensure_real_model(out)
            ensure_demo_models(out)
            return 0
    except (ConfigError, TlsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except grpc.RpcError as e:
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
