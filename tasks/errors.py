"""The one error type for user mistakes: the CLI prints it as one line and exits 2."""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Iterator


class UserError(ValueError):
    """A mistake in the config or its inputs, located by `where` (a config path, a file or a URI).

    Code that sees only part of the config (a step, a settings model) names the key relative to that
    part; whoever knows where that part sits in the config moves the error there (`under`, `located`).
    """

    def __init__(self, where: str, problem: str, hint: str = "") -> None:
        self.where, self.problem, self.hint = where, problem, hint
        super().__init__(self.line())

    def __reduce__(self):  # Prefect pickles a failed step's exception into its result
        return (type(self), (self.where, self.problem, self.hint))

    def line(self) -> str:
        text = f"{self.where}: {self.problem}" if self.where else self.problem
        return printable(f"{text} ({self.hint})" if self.hint else text)

    def under(self, prefix: str) -> UserError:
        """The same error, for a key `where` inside the section at `prefix`."""
        if not prefix:
            return self
        where = self.where if self.where.startswith("[") or not self.where else f".{self.where}"
        return type(self)(prefix + where if self.where else prefix, self.problem, self.hint)


def each_once(names: list[str], key: str, repeated: str, hint: str) -> None:
    """A UserError at the first name that an earlier entry has too: `key` is the list's key ("metrics"),
    `repeated` what is said of the name ("names an earlier metric too")."""
    for index, name in enumerate(names):
        if name in names[:index]:
            raise UserError(f"{key}[{index}].name", f"'{name}' {repeated}", hint)


class UserErrors(UserError):
    """Several user mistakes found at once, reported one line each."""

    def __init__(self, errors: list[UserError]) -> None:
        self.errors = errors
        super().__init__("", "\n".join(e.line() for e in errors))

    def __reduce__(self):
        return (UserErrors, (self.errors,))

    def line(self) -> str:
        return "\n".join(e.line() for e in self.errors)

    def under(self, prefix: str) -> UserErrors:
        return UserErrors([e.under(prefix) for e in self.errors])


class Unreachable(UserError):
    """Something the config names that this machine cannot reach now: no credentials, no network, no client
    library. Not necessarily a mistake in the config: `grove validate` reports it and goes on."""


class NoCredentials(Unreachable):
    """Storage that needs credentials nobody gave; the edge that knows how to store them adds the hint."""


@contextlib.contextmanager
def located(prefix: str) -> Iterator[None]:
    """Raise the UserErrors of the block under `prefix`: its keys are relative to that section."""
    try:
        yield
    except UserError as exc:
        raise exc.under(prefix) from None


def nearest(name: str, choices: Iterable[str]) -> str:
    """A 'did you mean' hint for a misspelt name, or the valid ones (the first few, if there are many)."""
    choices = sorted(str(c) for c in choices)
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    if len(choices) > 12:
        return f"valid: {', '.join(choices[:8])}, … ({len(choices)} in all)"
    return "valid: " + ", ".join(choices) if choices else ""


def printable(text: str) -> str:
    """One line, whatever a key or value held: control characters are shown escaped."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def shown(value: object, limit: int = 60) -> str:
    """A value as an error line may echo it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message as one line of an error: its first line, or its type when it has none."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
