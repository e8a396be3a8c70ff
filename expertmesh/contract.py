"""Names of the wire contract, defined once: the gRPC services and the health services an
expert publishes (``protos/expertmesh/v1/expertmesh.proto`` is the source)."""

from __future__ import annotations

from expertmesh.v1 import expertmesh_pb2 as pb

#: ``expertmesh.v1.Gateway``.
GATEWAY_SERVICE: str = pb.DESCRIPTOR.services_by_name["Gateway"].full_name
#: ``expertmesh.v1.Expert``: its health says whether the expert can take a request.
EXPERT_SERVICE: str = pb.DESCRIPTOR.services_by_name["Expert"].full_name
#: ``expertmesh.v1.Expert/engine``: SERVING only while the expert's engine is loaded (warm).
ENGINE_SERVICE = f"{EXPERT_SERVICE}/engine"
#: max_tokens when neither the request nor the model's generation_config sets it: room for an
#: ordinary answer (a few paragraphs, a function: 100-400 tokens) with a bound, so that a
#: forgotten limit cannot keep a stream (and its buffered tokens) busy up to max_model_len. The
#: gateway counts a tenant's token budget by it too.
DEFAULT_MAX_TOKENS = 512
