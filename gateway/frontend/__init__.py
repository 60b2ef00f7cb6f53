"""Front ends: the OpenAI-compatible HTTP API and the gRPC Generate service."""
