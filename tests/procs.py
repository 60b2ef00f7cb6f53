"""Real Breakwater processes for tests: the same harness the chaos suite uses."""

from loadtest.fleet import Proc, start_gateway, start_sim_worker, start_worker, wait_for

__all__ = ["Proc", "start_gateway", "start_sim_worker", "start_worker", "wait_for"]
