"""The expert process: a grpc.aio server over one vLLM AsyncLLM engine."""
