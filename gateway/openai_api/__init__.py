"""The gateway's OpenAI-compatible HTTP front: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models`` and ``/health`` on ``gateway.http_port``, over the gRPC front's routing path."""
