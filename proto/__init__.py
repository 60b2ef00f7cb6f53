"""The wire contract between gateway and workers."""
