"""Gateway: the HTTP and gRPC front door (never imports torch or the engine)."""
