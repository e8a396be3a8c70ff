"""Run one expert: bind the port first, then load eagerly (NOT_SERVING until loaded) or wait for
the first request (lazy: SERVING while COLD); unload when idle; stop when the engine dies.

Shutdown order on SIGTERM/SIGINT: health NOT_SERVING -> stop accepting and let in-flight
streams finish within the grace period -> shut the engine (and its processes) down.
The exit code is 1 when the expert ends FAILED (the supervisor then restarts it), else 0.
"""

from __future__ import annotations

import asyncio
import logging

from expertmesh.config import ExpertConfig, LimitsConfig, MeshConfig
from expertmesh.contract import EXPERT_SERVICE
from expertmesh.errors import Unavailable
from expertmesh.rpc import enable_reflection
from expertmesh.runtime import Runtime
from expertmesh.telemetry import Identity, watch_expert
from expertmesh.tls import RequirePeerCertificate, TlsError, expert_server_certs, insecure_bind_refusal
from expertmesh.v1 import expertmesh_pb2_grpc as pb_grpc

from .budget import MemoryBudget
from .health import ExpertHealth
from .ipc_dir import IpcDir
from .lifecycle import FAILED, Lifecycle
from .output_tail import OutputTail
from .prompt import Prompts
from .servicer import ExpertServicer

log = logging.getLogger(__name__)
HOUSEKEEPING_INTERVAL_S = 0.5
#: Time given to streams to end after the engine died (they fail at once with the cause).
DEAD_ENGINE_GRACE_S = 1.0


async def _housekeeping(life: Lifecycle, stop: asyncio.Event) -> None:
    """Watch for engine death (then stop the process) and for idleness (then unload)."""
    limit = life.cfg.idle_unload_after_s
    while True:
        await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
        quiet = life.stalled_for()
        if quiet is not None:
            life.fail_stalled(quiet)
        if life.check_engine():
            log.error("expert %s: %s; stopping so that it is restarted", life.cfg.expert_id, life.last_error)
            stop.set()
            return
        if life.idle_unload_due():
            life.request_unload(f"idle for {life.idle_seconds:.0f} s (idle_unload_after_s={limit:g})")


async def _warm_tokenizer(prompts: Prompts) -> None:
    try:
        await prompts.tokenizer()
    except Unavailable as e:
        log.warning("%s (requests will retry)", e)


async def serve(cfg: ExpertConfig, port: int, grace_s: float, mesh: MeshConfig | None = None) -> int:
    """Serve until a signal or engine death; return the process exit code."""
    try:
        certs = expert_server_certs(mesh, cfg.expert_id) if mesh else None
    except TlsError as e:
        log.error("expert %s cannot use its certificates: %s", cfg.expert_id, e)
        return 2
    refusal = insecure_bind_refusal(mesh, cfg) if mesh else None
    if refusal:
        log.error("%s", refusal)
        return 2
    output = OutputTail().install()  # so that a failed load reports the engine processes' error
    ipc = IpcDir.claim()
    limits = mesh.limits if mesh is not None else LimitsConfig()
    # Under internal_tls the handshake already requires a mesh certificate; the interceptor
    # keeps Load, Unload and Multiplex closed even if that ever changed.
    runtime = Runtime(
        Identity("expert", cfg.expert_id, cfg.domain, cfg.model_path),
        cfg.metrics_port,
        cfg.host,
        limits.max_message_bytes,
        [RequirePeerCertificate()] if certs else [],
    )
    budget = MemoryBudget.for_mesh(mesh, cfg.expert_id)
    prompts = Prompts(cfg)
    # The tokenizer is loaded before the engine, never alongside it: both import transformers,
    # whose lazy imports are not thread-safe (seen: "cannot import name 'PreTrainedConfig'").
    life = Lifecycle(
        cfg,
        before_load=budget.make_room if budget else None,
        prepare=lambda: _warm_tokenizer(prompts),
        output=output,
        ipc=ipc,
    )
    watch_expert(
        cfg.expert_id,
        lambda: life.state,
        lambda: life.engine.get_num_unfinished_requests() if life.engine else 0,
        cfg.max_queue,
    )
    servicer = ExpertServicer(life, prompts, limits)
    pb_grpc.add_ExpertServicer_to_server(servicer, runtime.server)
    health = ExpertHealth(runtime.server, life)
    enable_reflection(runtime.server, [EXPERT_SERVICE])
    await health.apply()
    try:
        bound = runtime.bind(cfg.host, port, certs.credentials() if certs else None)
    except (OSError, RuntimeError) as e:  # grpcio raises RuntimeError for a port in use
        log.error("expert %s cannot listen on %s:%d: %s", cfg.expert_id, cfg.host, port, e)
        runtime.abandon()
        output.close()
        ipc.remove()
        return 1
    await runtime.start()
    log.info(
        "expert %s listening on %s:%d (%s, load: %s)",
        cfg.expert_id,
        cfg.host,
        bound,
        "mTLS" if certs else "plaintext",
        cfg.load,
    )
    if cfg.load == "eager":
        life.start_load(on_demand=False)
    # The tokenizer (and the vLLM import it needs) is cheap next to the engine: have it ready
    # before the first request, so that a cold expert validates and tokenizes at once.
    runtime.background(_warm_tokenizer(prompts))
    runtime.background(_housekeeping(life, runtime.stop))
    runtime.draining += [
        servicer.drain,  # new streams refused (UNAVAILABLE: fail over); calls end when theirs have
        health.shutdown,  # NOT_SERVING, and the health Watch streams end
    ]

    # Nothing in flight can finish on a dead engine (its streams have already ended with the
    # cause), so a dead engine does not hold the restart for the whole grace period.
    def grace() -> float:
        return DEAD_ENGINE_GRACE_S if life.state == FAILED else grace_s

    runtime.closing += [lambda: life.close(grace()), ipc.remove]
    try:
        await runtime.serve(grace)
    finally:
        log.info("expert %s stopped", cfg.expert_id)
        output.close()
    return 1 if life.state == FAILED else 0
