"""The one error a prompt can raise; the engine and the gateway map it to their own."""


class PromptError(ValueError):
    """The prompt cannot be tokenized as given; `param` names the offending request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
