"""Generated gRPC and protobuf code of the milter_bridge.v1 policy API."""
