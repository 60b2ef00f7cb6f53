"""Load generation, chaos scenarios and benchmarks."""
