"""Worker: one process per accelerator hosting an inference engine."""
