"""Detect when a transcript has just completed a marker string (think-end marker, stop strings).

Markers are matched on the decoded text of the transcript's last tokens, not on token ids: a
marker such as "</think>" is several tokens for Llama-3.2 and SmolLM2, and the model may spell
it with other splits ("</" + "think>" or "\n</think>"). A marker completes at the step whose
token makes it appear in the decoded tail; a lone sub-token of the marker never matches.
"""

from __future__ import annotations


class TextMatcher:
    def __init__(self, tokenizer, strings: list[str] | tuple[str, ...]):
        self.tokenizer = tokenizer
        self.strings = tuple(s for s in strings if s)
        # every token decodes to >= 1 character, so a marker spans at most len(marker) tokens
        self.window = max((len(s) for s in self.strings), default=0) + 1
        self._last_chars = {s[-1] for s in self.strings}
        self._can_end: dict[
            int, bool
        ] = {}  # token id -> its text holds some marker's last character

    def completed(self, tokens: list[int]) -> str | None:
        """The marker that the last token of `tokens` completes, if any."""
        if not self.strings or not tokens or not self._may_end(tokens[-1]):
            return None
        tail = tokens[-self.window :]
        now = self.tokenizer.decode(tail, skip_special_tokens=False)
        before = self.tokenizer.decode(tail[:-1], skip_special_tokens=False)
        # the window starts at the same token in both, so a new occurrence ends at the last token
        return next((s for s in self.strings if now.count(s) > before.count(s)), None)

    def _may_end(self, token: int) -> bool:
        """Cheap pre-check: a token that cannot supply a marker's last character completes none."""
        can = self._can_end.get(token)
        if can is None:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            # byte-level pieces of a multi-byte character decode to U+FFFD alone: keep checking them
            can = self._can_end[token] = "\ufffd" in text or any(
                c in text for c in self._last_chars
            )
        return can
