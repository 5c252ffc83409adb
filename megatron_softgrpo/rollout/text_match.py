"""Detect when a transcript has just completed a marker string (think-end marker, stop strings).

A string completes at the step whose token ends an occurrence of it (occurrences may overlap):
on a byte-level BPE tokenizer (every one this project supports), an occurrence of the string's
UTF-8 bytes ends within the last token's bytes. This is the host side of `string_automaton.py`
(the same tables), so the eager and the static engine agree. A marker such as "</think>" is
several tokens for Llama-3.2 and SmolLM2 and the model may spell it with other splits ("</" +
"think>" or "\\n</think>"); a lone sub-token of the marker never completes it.

Other tokenizers fall back to the same definition on decoded text: an occurrence ends in the part
of decode(tail) that differs from decode(tail[:-1]).
"""

from __future__ import annotations

import os

import numpy as np

from megatron_softgrpo.rollout.string_automaton import (
    NotByteLevelError,
    StringAutomaton,
    token_bytes,
)


class TextMatcher:
    def __init__(self, tokenizer, strings: list[str] | tuple[str, ...]):
        self.tokenizer = tokenizer
        self.strings = tuple(s for s in strings if s)
        # a non-empty token has >= 1 byte, so an occurrence spans at most len(bytes) tokens
        self.reach = max((len(s.encode("utf-8")) for s in self.strings), default=0)
        try:
            vocab = token_bytes(tokenizer)
        except NotByteLevelError:
            self._table = None  # decoded-text fallback
            self._last_chars = {s[-1] for s in self.strings}
            self._can_end: dict[int, bool] = {}  # token id -> it may supply a last character
            return
        # [Q, V + 1, 2] int16: (next state, string or -1); column V: ids the tokenizer lacks
        self._table = table = StringAutomaton.from_vocab(vocab, self.strings, "cpu").table.numpy()
        self._lengths = np.append(vocab.lengths, 0)  # bytes per token id
        self._ends = (table[:, :, 1] >= 0).any(axis=0)  # token -> completes from some state

    def completed(self, tokens: list[int]) -> str | None:
        """The first string (in the given order) that the last token of `tokens` completes."""
        if not self.strings or not tokens or not self._may_end(tokens[-1]):
            return None
        if self._table is None:
            return self._text_completed(tokens)
        v = len(self._lengths) - 1
        ids = [t if 0 <= t < v else v for t in tokens]
        # the automaton state is the stream's longest suffix that is a prefix of some string, so
        # the last `reach` bytes before the token determine it: run from the empty state over them
        start, held = len(ids) - 1, 0
        while start > 0 and held < self.reach:
            start -= 1
            held += int(self._lengths[ids[start]])
        state = 0
        for t in ids[start:-1]:
            state = int(self._table[state, t, 0])
        which = int(self._table[state, ids[-1], 1])
        return self.strings[which] if which >= 0 else None

    def _text_completed(self, tokens: list[int]) -> str | None:
        tail = tokens[-(self.reach + 1) :]
        now = self.tokenizer.decode(tail, skip_special_tokens=False)
        before = self.tokenizer.decode(tail[:-1], skip_special_tokens=False)
        # the last token changed `now` after the common prefix (a U+FFFD it completes included)
        p = len(os.path.commonprefix([now, before]))
        return next((s for s in self.strings if now.find(s, max(0, p - len(s) + 1)) >= 0), None)

    def _may_end(self, token: int) -> bool:
        """Cheap pre-check: a token that cannot end an occurrence of a string completes none."""
        if self._table is not None:  # exact: the token completes a string from some state
            return bool(self._ends[token if 0 <= token < len(self._ends) - 1 else -1])
        can = self._can_end.get(token)
        if can is None:
            text = self.tokenizer.decode([token], skip_special_tokens=False)
            # byte-level pieces of a multi-byte character decode to U+FFFD alone: keep checking them
            can = self._can_end[token] = "\ufffd" in text or any(
                c in text for c in self._last_chars
            )
        return can
