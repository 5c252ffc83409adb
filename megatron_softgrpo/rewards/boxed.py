"""The final answer of a response: the content of its right-most `\\boxed{...}` (docs/algorithm.md section 6)."""

from __future__ import annotations

import re

# `\boxed` or `\fbox` as a whole command (not the prefix of a longer one such as `\boxedtext`).
_BOXED_COMMAND = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
# `\boxed 5`: the argument is the next whitespace-free run, up to a `$` math delimiter.
_UNBRACED_ARGUMENT = re.compile(r"[ \t]+([^\s$]+)")


def last_boxed(text: str) -> str | None:
    """Content of the right-most `\\boxed{...}` / `\\fbox{...}` / `\\boxed 5` of the whole text.

    Braces nest; `\\{` and `\\}` are literal braces and do not count. Only the right-most
    command is considered: if its argument is unterminated (a truncated response) or empty,
    there is no answer (None), even when an earlier box is complete. A trailing period
    after an unbraced argument is sentence punctuation, not part of the answer.
    """
    commands = list(_BOXED_COMMAND.finditer(text))
    if not commands:
        return None
    start = commands[-1].end()
    if start < len(text) and text[start] != "{":
        match = _UNBRACED_ARGUMENT.match(text, start)
        if match is None:
            return None
        answer = match.group(1).rstrip(".")
        return answer or None
    return _braced_argument(text, start)


def _braced_argument(text: str, start: int) -> str | None:
    """The group opened by the `{` at text[start], without its braces; None when unterminated or empty."""
    depth = 0
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2  # an escaped character, e.g. \{ or \}
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                answer = text[start + 1 : i].strip()
                return answer or None
        i += 1
    return None
