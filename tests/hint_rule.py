"""The rule every user-facing error line is held to (README, "Guarantees").

An error line passes when it

(a) **names the offending input**: it contains, verbatim, the culprit a test declares for the
    case: the path as the user gave it (or the file inside it), the tensor or module name,
    the option (``--dtype``) or the value (``int7``); and

(b) **gives a concrete next step**: at least one of
    - an imperative clause: one of :data:`ACTION_VERBS` at the start of a clause (start of
      the message, or after ``;`` ``:`` ``.`` ``?`` ``!`` ``,`` ``(``, or after "or", "and",
      "then", "instead") followed by its object (at least one more word, flag or path);
    - a command in backticks that starts with a program the user can run
      (``loretta-merge``, ``pip``, ``python``, ``torchrun``, ``accelerate``);
    - ``pip install PACKAGE``.

Words that state a rule without an action ("must", "expected", "needs", "only",
"supported", "see", "check", "try", "invalid") are not a next step on their own, and a verb
that describes what happened ("could not convert", "failed to copy", "cannot use") is not at
the start of a clause, so it does not count either.
"""

from __future__ import annotations

import re

# imperative verbs that name an action the user can take
ACTION_VERBS = (
    "pass", "use", "choose", "give", "set", "add", "remove", "delete", "drop", "rename",
    "move", "copy", "fix", "re-save", "resave", "save", "re-download", "redownload", "download",
    "re-export", "export", "convert", "install", "upgrade", "downgrade", "free", "retrain",
    "train", "rerun", "run", "merge", "deploy", "point", "name", "select", "lower", "raise",
    "increase", "reduce", "omit", "leave", "split", "edit", "replace", "load", "apply", "keep",
    "write", "specify", "provide", "list", "put", "restart", "update", "recreate", "re-create",
    "regenerate", "enable", "disable", "shorten", "label", "make", "start", "call", "clean",
    "pick", "build", "rebuild", "reinstall", "fill", "report",
)
PROGRAMS = ("loretta-merge", "pip", "python", "torchrun", "accelerate")

_BOUNDARY = r"(?:^|[;:.?!,]\s+|\(\s*|\b(?:or|and|then|instead|otherwise)\s+)"
_VERB = r"(?:" + "|".join(re.escape(v) for v in sorted(ACTION_VERBS, key=len, reverse=True)) + r")"
IMPERATIVE = re.compile(_BOUNDARY + r"(" + _VERB + r")\s+(?=[\w`'\"./~{<(\[-])", re.I)
COMMAND = re.compile(r"`(?:" + "|".join(map(re.escape, PROGRAMS)) + r")\b[^`]*`")
PIP = re.compile(r"\bpip install\s+\S+")


def next_steps(text: str) -> list[str]:
    """The next-step markers found in ``text`` (empty when it gives none)."""
    found = [m.group(1) for m in IMPERATIVE.finditer(text)]
    found += COMMAND.findall(text) + PIP.findall(text)
    return found


def rule_problems(line: str, culprits: tuple[str, ...]) -> list[str]:
    """Why ``line`` (one ``error: ...`` line) breaks the rule; empty when it keeps it."""
    problems = []
    if not line.startswith("error: "):
        return [f"does not start with 'error: ': {line!r}"]
    text = line[len("error: "):]
    if not culprits:
        problems.append("the case declares no culprit")
    for culprit in culprits:
        if culprit not in text:
            problems.append(f"does not name the offending input {culprit!r}")
    if not next_steps(text):
        problems.append("gives no concrete next step (an imperative such as 'pass --flag', "
                        "a `loretta-merge ...` command, or `pip install ...`)")
    return problems
