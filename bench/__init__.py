"""Benchmarks: the mesh against in-process vLLM and vLLM's own servers, side by side.

``expertmesh bench [--quick] [--out DIR] [--trials N]`` measures, in one run, on the same tiny
model with the same engine settings and the same load:

- ``inprocess``: ``AsyncLLM.generate`` with no serving layer (the limit);
- ``expert``: straight to one expert over gRPC;
- ``gateway``: through the gateway to that expert;
- ``gateway_openai``: through the gateway's OpenAI-compatible HTTP front (``vllm_openai``'s client);
- ``gateway_tls``: the same with TLS + a bearer token from the client and mTLS to its own expert;
- ``relay``: through a bare gRPC relay to that expert (the cost of a second hop by itself);
- ``vllm_grpc``: vLLM's own gRPC server;
- ``vllm_openai``: vLLM's OpenAI-compatible HTTP server, streaming;

at 1, 8, 32 and 128 concurrent streams, and writes ``DIR/results.json``, ``DIR/results.png``,
``DIR/results.md`` and the servers' logs under ``DIR/logs/``. See ``bench/README.md`` for the targets.
"""

if __name__ != "expertmesh.bench":  # ``import bench`` from the repository root: a second copy
    raise ImportError(
        f"import expertmesh.bench, not {__name__}: the bench/ folder is that package (package-dir)"
    )
