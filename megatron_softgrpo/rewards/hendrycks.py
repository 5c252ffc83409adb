"""The reference's reward: string equality after Hendrycks-MATH normalisation of the last box.

This follows verl 0.4's `verl/utils/reward_score/math_reward.py` (named `math.py` in the v0.4
releases), the grader the SofT-GRPO reference trained with. verl (Apache-2.0) adapted it from
lm-evaluation-harness's `hendrycks_math` task (Apache-2.0), which took it from the MATH
benchmark's own equivalence check (Hendrycks et al. 2021, MIT). It is written here anew from that
behaviour, quirks included, because the point is to reproduce the paper's training signal:

- `\\boxed ` with a space, anywhere in the text, takes priority over every braced box: the
  answer is what follows its last occurrence, up to the next `$` or the end of the text (so a
  trailing sentence becomes part of the answer).
- Otherwise the last `\\boxed` is taken; `\\fbox` is looked for only when the text has no
  `\\boxed` at all, and such an answer then always scores 0 (`remove_boxed` knows `\\boxed` only).
- Braces are counted from the command on, with no escapes (`\\{` counts); an unterminated box
  has no answer.
- `strip_string` normalises spelling only (spaces, `\\left`/`\\right`, `\\dfrac`, `\\frac12`,
  `\\sqrt3`, degrees, `\\$`, `\\%`, a right-hand `\\text{ unit}`, a short `k =` prefix, `a/b`,
  and the single string `0.5`); there is no numeric or symbolic equivalence. So `0.75` is not
  `\\frac{3}{4}`, `3.0` is not `3` and `2\\sqrt{2}` is not `\\sqrt{8}`: math-verify accepts all
  three.
- An error inside the normalisation (a trailing `\\frac` or `\\sqrt`, two `\\text{ ` units)
  makes `is_equiv` compare the raw strings instead; any error in `compute_score` scores 0.

Differences that change no score: the reference's `assert`s are explicit exceptions here (they
would vanish under `python -O`), and its diagnostic prints are left out.
"""

from __future__ import annotations


def compute_score(solution: str, ground_truth: str) -> float:
    """1.0 when the last box of `solution` equals `ground_truth` after normalisation, else 0.0."""
    try:
        boxed = last_boxed_only_string(solution)
        if boxed is not None and is_equiv(remove_boxed(boxed), ground_truth):
            return 1.0
    except Exception:  # the reference scores any failure (e.g. an \fbox answer) 0
        pass
    return 0.0


def is_equiv(str1: str | None, str2: str | None) -> bool:
    """Equal after `strip_string`; the raw strings are compared when normalising fails."""
    if str1 is None and str2 is None:
        return True
    if str1 is None or str2 is None:
        return False
    try:
        return strip_string(str1) == strip_string(str2)
    except Exception:
        return str1 == str2


def last_boxed_only_string(string: str) -> str | None:
    """The last box of `string` with its command: `\\boxed{...}`, `\\boxed ...` or `\\fbox{...}`."""
    if "\\boxed " in string:  # first, wherever it is: the text after the last one, up to a `$`
        return "\\boxed " + string.split("\\boxed ")[-1].split("$")[0]
    start = string.rfind("\\boxed")
    if start < 0:
        start = string.rfind("\\fbox")
        if start < 0:
            return None
    depth = 0
    for i in range(start, len(string)):
        if string[i] == "{":
            depth += 1
        elif string[i] == "}":
            depth -= 1
            if depth == 0:
                return string[start : i + 1]
    return None


def remove_boxed(s: str) -> str:
    """The argument of a `\\boxed ...` or `\\boxed{...}` string; ValueError for anything else."""
    if "\\boxed " in s:
        if not s.startswith("\\boxed "):
            raise ValueError(f"not a '\\boxed ' answer: {s!r}")
        return s[len("\\boxed ") :]
    if not (s.startswith("\\boxed{") and s.endswith("}")):
        raise ValueError(f"not a '\\boxed{{}}' answer: {s!r}")
    return s[len("\\boxed{") : -1]


def strip_string(string: str) -> str:
    """The Hendrycks-MATH normal form of an answer, step by step in the reference's order."""
    string = string.replace("\n", "")
    string = string.replace("\\!", "")  # negative thin spaces
    string = string.replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")  # degrees
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")  # (a plain % stays)
    # " 0." is " ." and "{0." is "{."; a leading "." gets its 0
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    # a short left-hand side such as "k = " or "x=" goes
    sides = string.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        string = sides[1]
    string = _fix_sqrt(string)
    string = string.replace(" ", "")
    string = _fix_fracs(string)
    if string == "0.5":  # the one decimal the reference rewrites
        string = "\\frac{1}{2}"
    return _fix_a_slash_b(string)


def _remove_right_units(string: str) -> str:
    """What precedes a `\\text{ ` (a unit, in the MATH data); ValueError when there are two."""
    if "\\text{ " not in string:
        return string
    parts = string.split("\\text{ ")
    if len(parts) != 2:
        raise ValueError(f"more than one '\\text{{ ' unit in {string!r}")
    return parts[0]


def _fix_sqrt(string: str) -> str:
    """`\\sqrt3` -> `\\sqrt{3}` (one character); a trailing `\\sqrt` raises IndexError."""
    if "\\sqrt" not in string:
        return string
    pieces = string.split("\\sqrt")
    out = pieces[0]
    for piece in pieces[1:]:
        if piece[0] != "{":
            out += "\\sqrt{" + piece[0] + "}" + piece[1:]
        else:
            out += "\\sqrt" + piece
    return out


def _fix_fracs(string: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{72}` -> `\\frac{1}{72}`; a trailing `\\frac` raises IndexError,
    a `\\frac` followed by one character leaves the whole string as it was."""
    pieces = string.split("\\frac")
    out = pieces[0]
    for piece in pieces[1:]:
        out += "\\frac"
        if piece[0] == "{":
            out += piece
            continue
        if len(piece) < 2:
            return string
        a, b, rest = piece[0], piece[1], piece[2:]
        out += "{" + a + "}{" + b + "}" + rest if b != "{" else "{" + a + "}" + b + rest
    return out


def _fix_a_slash_b(string: str) -> str:
    """`3/4` -> `\\frac{3}{4}` when both sides are integers written plainly; else unchanged."""
    parts = string.split("/")
    if len(parts) != 2:
        return string
    try:
        a, b = int(parts[0]), int(parts[1])
    except ValueError:
        return string
    if string != f"{a}/{b}":
        return string
    return "\\frac{" + str(a) + "}{" + str(b) + "}"
