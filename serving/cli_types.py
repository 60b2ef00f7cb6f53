"""argparse types shared by the gateway's and the worker's command lines.

Each one turns a bad value into argparse's usage error (exit 2, one line naming the flag)
rather than a traceback or a process that starts broken. Defaults read from BREAKWATER_*
variables are passed as strings (`env_default`), so argparse converts them with the same
type, and their errors also name the variable.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


class EnvValue(str):
    """A flag's default taken from an environment variable (its name in `.env`)."""

    env: str


def env_default(var: str, fallback: str | None = None) -> str | None:
    """The variable's text as a flag default (unset or empty: `fallback`), unconverted."""
    value = os.environ.get(var)
    if not value:
        return fallback
    out = EnvValue(value)
    out.env = var
    return out


def _typed(name: str, convert: Callable[[str], T]) -> Callable[[str], T]:
    """`convert`, with the variable's name added to its error for an env default."""

    def parse(text: str) -> T:
        try:
            return convert(text)
        except argparse.ArgumentTypeError as e:
            env = getattr(text, "env", None)
            if env:
                raise argparse.ArgumentTypeError(f"{e} (from {env})") from None
            raise

    parse.__name__ = name
    return parse


def number(
    low: float, high: float = float("inf"), low_open: bool = False
) -> Callable[[str], float]:
    """A finite float in [low, high] ((low, high] when `low_open`)."""

    def convert(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (low < x if low_open else low <= x) or not x <= high or not math.isfinite(x):
            upper = f"<= {high:g}" if math.isfinite(high) else "finite"
            raise argparse.ArgumentTypeError(
                f"{text} must be {'>' if low_open else '>='} {low:g} and {upper}"
            )
        return x

    return _typed("number", convert)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An integer in [low, high] (no upper bound when `high` is None)."""

    def convert(text: str) -> int:
        n = _int(text)
        if n < low or (high is not None and n > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"{text} must be an integer {bound}")
        return n

    return _typed("integer", convert)


def port(allow_off: bool = False) -> Callable[[str], int]:
    """A TCP port, 0..65535 (0: any free one); with `allow_off`, also -1 (no listener)."""

    def convert(text: str) -> int:
        n = _int(text)
        if not (-1 if allow_off else 0) <= n <= 65535:
            extra = ", or -1 for none" if allow_off else ""
            raise argparse.ArgumentTypeError(
                f"{text} is not a port number (0..65535, 0: any free port{extra})"
            )
        return n

    return _typed("port", convert)


def choice(options: Iterable[str]) -> Callable[[str], str]:
    """One of `options`: checks an env default too, which argparse's `choices` does not."""
    allowed = tuple(options)

    def convert(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r} (choose from {', '.join(allowed)})"
            )
        return str(text)

    return _typed("choice", convert)


def model_pair(
    what: str, values: Iterable[str] = (), directory: bool = False
) -> Callable[[str], str]:
    """MODEL=VALUE (the model's name may hold '='; the value, one of `values` where given,
    may not), a directory that exists where `directory`: checked as the flag is parsed, so
    an error names the flag or its variable, and a missing directory is no silent no-op."""
    allowed = tuple(values)

    def convert(text: str) -> str:
        model, sep, value = text.rpartition("=") if allowed else text.partition("=")
        if not sep or not model or not value:
            raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL={what}")
        if allowed and value not in allowed:
            raise argparse.ArgumentTypeError(
                f"{text!r}: {what} must be one of {', '.join(allowed)}"
            )
        if directory and not os.path.isdir(value):
            raise argparse.ArgumentTypeError(f"{text!r}: no directory {value}")
        return str(text)

    return _typed("MODEL=" + what, convert)


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _env_bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in _TRUE + _FALSE:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not one of {', '.join(_TRUE)} or {', '.join(v for v in _FALSE if v)}"
        )
    return value in _TRUE


def _env_list(convert: Callable[[str], T] | None) -> Callable[[str], list[T] | T]:
    """A repeatable flag's type: its values one at a time from the command line, or all
    of them from its variable, comma-separated (the default, an EnvValue)."""

    def parse(text: str) -> list[T] | T:
        if not isinstance(text, EnvValue):
            return convert(text) if convert else text  # type: ignore[return-value]
        items = []
        for part in text.split(","):
            if part.strip():
                item = EnvValue(part.strip())
                item.env = text.env
                try:
                    items.append(convert(item) if convert else item)
                except argparse.ArgumentTypeError as e:
                    if text.env in str(e):
                        raise
                    raise argparse.ArgumentTypeError(f"{e} (from {text.env})") from None
        return items  # type: ignore[return-value]

    return parse


class DefaultsHelp(argparse.HelpFormatter):
    """--help shows each flag's default where its text does not say it already: operators
    read the defaults there (drain timeout, ports, queue sizes), not in the code."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            not action.option_strings
            or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS))
            or "default" in text
        ):
            return text
        if isinstance(action.default, EnvValue) or _from_environment(action.default):
            # never the value: a token or a Redis URL's password, printed by --help
            return f"{text} (set from the environment)".lstrip()
        return f"{text} (default: %(default)s)".lstrip()


def _from_environment(value: object) -> bool:
    """A default some BREAKWATER_* variable gave (read by its flag's own definition)."""
    return isinstance(value, str) and any(
        v == value for k, v in os.environ.items() if k.startswith("BREAKWATER_")
    )


def redacted(url: str) -> str:
    """`url` without the password in its user part, for a message or a log line."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if not sep or not at:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in userinfo else f"{scheme}://***@{host}"


def env_help(prefix: str, also: str = "") -> str:
    """The --help epilog that says how a flag is set from the environment."""
    return (
        f"Every flag can also be set from the environment as {prefix}<FLAG> (--max-queue: "
        f"{prefix}MAX_QUEUE; booleans 1/0, repeatable flags comma-separated); the command "
        f"line wins.{(' ' + also) if also else ''}"
    )


def env_defaults(parser: argparse.ArgumentParser, prefix: str) -> None:
    """Every long flag of `parser` without one already takes its default from
    `{prefix}{FLAG}` (`--max-queue` from `BREAKWATER_GATEWAY_MAX_QUEUE`), converted and
    checked as the flag is, its errors naming the variable; a flag on the command line
    wins. Booleans take 1/true/yes/on or 0/false/no/off; a repeatable flag, a
    comma-separated list. Operators in containers set variables, not argument lists."""
    for action in parser._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if (
            not longs
            or action.dest == "help"
            or action.help == argparse.SUPPRESS  # internal (a gateway's --process-index)
            or isinstance(action.default, EnvValue)
        ):
            continue
        var = prefix + longs[0][2:].replace("-", "_").upper()
        value = os.environ.get(var)
        if value is None:
            continue
        text = EnvValue(value)
        text.env = var
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
            truth = _typed("boolean", _env_bool)
            if isinstance(action, argparse._StoreFalseAction):
                action.type = lambda t, truth=truth: not truth(t)
            else:
                action.type = truth  # converts only this default: a given flag takes const
        elif isinstance(action, argparse._AppendAction):
            action.type = _env_list(action.type)  # type: ignore[arg-type]
            action.__class__ = _AppendOverEnv
        action.default = text


class _AppendOverEnv(argparse._AppendAction):
    """A repeatable flag whose default is a variable's list: given on the command line, it
    starts a list of its own (the command line wins, as for every other flag)."""

    def __call__(  # type: ignore[override]
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        items = getattr(namespace, self.dest, None)
        items = [] if isinstance(items, EnvValue) or items is None else list(items)
        items.append(values)
        setattr(namespace, self.dest, items)
