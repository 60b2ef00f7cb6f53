"""Errors the engine raises for callers to map onto their own wire format."""


class EngineError(Exception):
    """Base class for engine errors."""


class InvalidRequestError(EngineError):
    """The request can never be served as given (bad parameters, too long, ...).

    `param` names the offending field so a server can fill an OpenAI-style error body.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(EngineError):
    """The engine configuration cannot run on this machine (e.g. over the memory budget)."""


class EngineDeadError(EngineError):
    """The engine's step loop has stopped; no request can be served."""
