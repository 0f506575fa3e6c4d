"""The error type of a bad configuration and the checks that word its messages.

Every rule of the configuration raises :class:`ConfigError` with one line that names the field
as ``section.field=value`` and states the rule, e.g. ``training.log_interval=0 must be a positive
integer``. The helpers below keep that wording the same for every field of every section.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Optional, Sequence


class ConfigError(ValueError):
    """A configuration value breaks a rule. The message names the field and the rule."""


def suggest(name: str, options: Sequence[Any]) -> str:
    """`` (did you mean 'x'?)`` for the option closest to ``name``, or ``""``."""
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_positive(where: str, value: Optional[int], optional: bool = False) -> None:
    """``value >= 1`` (``None`` allowed when ``optional``: the field's default applies)."""
    if value is None and optional:
        return
    if value is None or value < 1:
        raise ConfigError(f"{where}={value} must be a positive integer")


def check_at_least(where: str, value: float, low: float, meaning: str = "") -> None:
    """``value >= low`` (NaN fails); ``meaning`` (e.g. "0 disables it") is added in parentheses."""
    if not value >= low:
        raise ConfigError(f"{where}={value} must be >= {low}" + (f" ({meaning})" if meaning else ""))


def check_greater(where: str, value: float, low: float) -> None:
    """``low < value < inf``."""
    if not (value > low and math.isfinite(value)):
        raise ConfigError(f"{where}={value} must be a finite number > {low}")


def check_fraction(where: str, value: float) -> None:
    """``0 <= value < 1``."""
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{where}={value} must be in [0, 1)")


def check_choice(where: str, value: Any, choices: Sequence[Any]) -> None:
    """``value`` is one of ``choices``; the message lists them and suggests the closest."""
    if value not in choices:
        raise ConfigError(
            f"{where}='{value}' is not one of {', '.join(str(c) for c in choices)}{suggest(value, choices)}"
        )


def check_not_empty(where: str, value: Optional[str], unset_means: str) -> None:
    """A path or name is either unset (``None``) or a non-empty string."""
    if value is not None and not value.strip():
        raise ConfigError(f"{where}='{value}' is empty (leave it unset for {unset_means})")


def check_names(where: str, names: Optional[Sequence[str]], empty_hint: Optional[str] = None) -> None:
    """A list of names: no empty name, no repeated name; an empty list only when ``empty_hint`` is
    ``None`` (else it is refused with ``empty_hint`` in parentheses)."""
    if names is None:
        return
    if not names and empty_hint is not None:
        raise ConfigError(f"{where} is empty ({empty_hint})")
    blank = [i for i, name in enumerate(names) if not name.strip()]
    if blank:
        raise ConfigError(f"{where}[{blank[0]}]='{names[blank[0]]}' is an empty name")
    repeated = sorted({name for name in names if list(names).count(name) > 1})
    if repeated:
        raise ConfigError(f"{where}={list(names)} repeats {', '.join(repeated)}")
