"""Errors a user can cause. The CLI prints them as one line and exits 1."""


class PolarcError(Exception):
    """A mistake in the user's input: printed as `Error: <message>` with an optional hint."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
