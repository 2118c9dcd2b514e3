"""The one error type for user mistakes: the CLI prints it as one line and exits 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """A mistake in the config or its inputs, located by `where` (a config path, a file or a URI).

    Raised inside a pydantic validator, `where` is relative to the model being validated; the config
    loader prefixes the model's own path.
    """

    def __init__(self, where: str, problem: str, hint: str = "") -> None:
        self.where, self.problem, self.hint = where, problem, hint
        super().__init__(self.line())

    def __reduce__(self):  # Prefect pickles a failed step's exception into its result
        return (UserError, (self.where, self.problem, self.hint))

    def line(self) -> str:
        text = f"{self.where}: {self.problem}" if self.where else self.problem
        return f"{text} ({self.hint})" if self.hint else text


class UserErrors(UserError):
    """Several user mistakes found at once, reported one line each."""

    def __init__(self, errors: list[UserError]) -> None:
        self.errors = errors
        super().__init__("", "\n".join(e.line() for e in errors))

    def __reduce__(self):
        return (UserErrors, (self.errors,))

    def line(self) -> str:
        return "\n".join(e.line() for e in self.errors)


def nearest(name: str, choices: Iterable[str]) -> str:
    """A 'did you mean' hint for a misspelt name, or a list of the valid ones."""
    choices = sorted(choices)
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    return "valid: " + ", ".join(choices) if choices else ""
