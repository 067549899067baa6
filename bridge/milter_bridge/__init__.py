"""milter-bridge: a milter daemon that forwards each SMTP event to gRPC policy services."""

__version__ = "0.1.0.dev0"
