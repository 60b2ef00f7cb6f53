"""The operators' side of the gateway: a separate, token-guarded listener and its state."""
