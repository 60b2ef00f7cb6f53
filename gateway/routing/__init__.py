"""Routing policies: which ready worker gets a request."""
