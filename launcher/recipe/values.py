"""Checks of one recipe value each, the schema's validators: paths (the one place `~` is expanded), regular
expressions, lists naming each choice once, a warmup within the run. Imports no other wing and no torch."""
from __future__ import annotations

import os
import re

from launcher.errors import UserError


def expand_home(value: str, instead: str | None = None) -> str:
    """`~` and `~user` at the start of a path made into that home, as a shell would: the one place the launcher
    does it. Refused (ValueError; UserError naming `instead`, the setting that avoids it, when given) where there is
    no such home: with HOME empty, expanduser would make `~/run` into `/run`."""
    if not value.startswith("~"):
        return value
    user = value[1:].split("/", 1)[0]
    expanded = os.path.expanduser(value)
    if not user and not os.environ.get("HOME", "").strip():
        problem, fix = "starts with ~ but HOME is empty or unset, so there is no home to put it in", "set HOME or "
    else:
        problem, fix = (f"there is no user {user!r} whose home ~{user} could be", "") if expanded.startswith("~") else (None, "")
    if problem and instead:
        raise UserError(f"{value}: {problem}; {fix}{instead}")
    if problem:
        raise ValueError(f"{problem}; {fix}write the full path")
    return expanded


def path_value(value: str) -> str:
    """Every path key: not empty, and `~` is the user's home (as a shell would make it), data paths included."""
    if not value.strip():
        raise ValueError("empty path; give a file or folder")
    return expand_home(value)


def regex_value(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a valid regular expression ({exc})") from None
    return value


def listed_once(values: list) -> list:
    """A list of choices in which each is named once (a second mention would be ignored)."""
    twice = next((value for value in values if values.count(value) > 1), None)
    if twice is not None:
        raise ValueError(f"{twice!r} is listed twice")
    return values


def warmup_fits(warmup: int, steps: int, given_by: str) -> None:
    """Warmup no longer than the run (`given_by`: what sets its steps): the learning rate would never reach train.lr."""
    if warmup > steps:
        raise ValueError(f"train.warmup_steps {warmup} is more than the run's {steps} steps ({given_by}): the learning "
                         f"rate would never reach train.lr; lower train.warmup_steps to at most {steps}")
