"""Alternative executors behind the shared engine core (the `sim` timing model of a GPU)."""
