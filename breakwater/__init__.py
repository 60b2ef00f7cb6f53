"""Breakwater's public face: the client SDK and the `breakwater` command line.

Nothing here imports torch or the engine at import time: the SDK must stay light.
"""

__version__ = "0.1.0"
