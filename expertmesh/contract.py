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
