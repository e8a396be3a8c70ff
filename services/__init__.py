"""Expert services: one process per expert, one vLLM engine each."""
