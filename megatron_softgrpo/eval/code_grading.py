"""Code benchmarks: the solution code of a response and the test program built around it.

A response's solution is its last fenced code block tagged python (```python, ```py,
```python3) or untagged; an unterminated final block (a truncated response) does not count.
The test program is the benchmark's own test (HumanEval: `check(entry_point)` from its `test`
field; MBPP: its test imports and `assert` lines) and passes when it runs to its end (so every
test ran: an early `sys.exit(0)` or `os._exit(0)` fails) and exits with status 0 in the sandbox.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_PYTHON_TAGS = frozenset({"", "python", "py", "python3"})


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string lower-cased, content) of each complete ``` fenced block, in order."""
    blocks: list[tuple[str, str]] = []
    info: str | None = None  # None: outside a block
    lines: list[str] = []
    for line in text.splitlines():
        fence = line.strip()
        if info is None:
            if fence.startswith("```"):
                info, lines = fence[3:].strip().lower(), []
        elif fence == "```":
            blocks.append((info, "\n".join(lines) + "\n"))
            info = None
        else:
            lines.append(line)
    return blocks


def last_python_block(text: str) -> str | None:
    """The content of the last complete ```python (or untagged) fenced block; None if there is none."""
    python = [content for info, content in fenced_blocks(text) if info in _PYTHON_TAGS]
    return python[-1] if python else None


@dataclass(frozen=True)
class HumanEvalTests:
    prompt: str  # the function signature and docstring the model completes
    test: str  # defines check(candidate)
    entry_point: str
    canonical_solution: str  # the reference body, continuing the prompt

    def program(self, code: str) -> str:
        """Test program for `code`: a full definition of the entry point, or a body continuing the prompt.

        A full definition is appended after the prompt (the stub then only contributes its
        imports and helper functions, and the new definition replaces it).
        """
        defines_entry = re.search(
            rf"^\s*def\s+{re.escape(self.entry_point)}\s*\(", code, re.MULTILINE
        )
        solution = self.prompt + ("\n" + code if defines_entry else code)
        return f"{solution}\n\n{self.test}\n\ncheck({self.entry_point})\n"

    def reference_program(self) -> str:
        return self.program(self.canonical_solution)


@dataclass(frozen=True)
class MbppTests:
    test_imports: tuple[str, ...]
    test_list: tuple[str, ...]  # assert statements
    reference_code: str

    def program(self, code: str) -> str:
        imports = "\n".join(self.test_imports)
        asserts = "\n".join(self.test_list)
        return f"{imports}\n\n{code}\n\n{asserts}\n"

    def reference_program(self) -> str:
        return self.program(self.reference_code)


CodeTests = HumanEvalTests | MbppTests
