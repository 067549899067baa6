"""The gRPC side: the channel to the policy services, their capabilities, one stream per session."""
