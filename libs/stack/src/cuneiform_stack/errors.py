"""The one error type the stack raises: its message tells the user what went wrong and what to do."""

from __future__ import annotations


class StackError(RuntimeError):
    """A server could not be started, stopped or found; the message says what to do about it."""


class ServerExitedError(StackError):
    """A server process exited while we waited for it to answer."""

    def __init__(self, message: str, log_tail: str) -> None:
        super().__init__(message)
        self.log_tail = log_tail

    @property
    def port_conflict(self) -> bool:
        # nats-server, postgres and werkzeug all say "address already in use" in one spelling or another.
        return "in use" in self.log_tail.lower()
