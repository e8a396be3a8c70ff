"""Generated protobuf and gRPC code for package expertmesh.v1 (built from protos/)."""
