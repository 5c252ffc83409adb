"""Match marker and stop strings on the device: one gather per decode step, no host sync.

Definition: a string completes at a step iff an occurrence of it (occurrences may overlap) ends
within that step's token's bytes. Bytes, not text: every tokenizer this project supports (GPT-2
style SmolLM2, Qwen2, Llama-3) is byte-level BPE, so decode(tokens) is the UTF-8 decoding (errors
replaced) of the concatenated token bytes, and "the decoded text gains an occurrence at the last
token" is exactly "an occurrence of the string's UTF-8 bytes ends within the last token's bytes".
Text is not a prefix-stable view of the stream (a token holding part of a multi-byte character
decodes to U+FFFD alone, which the next token replaces), the byte stream is.

Built once on the host: an Aho-Corasick automaton over the strings' bytes, then, by running every
token's bytes from every automaton state (vectorised over the vocabulary), the token-level table
`table[state, token] = (next state, index of the first string, in the given order, that has an
occurrence ending within the token's bytes, or -1)`. On the device, `advance` is that gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_softgrpo.errors import UserError

NONE = -1  # "no string completes" in the index column of the table


class NotByteLevelError(UserError):
    """The tokenizer's tokens are not byte strings: the rollout cannot match its strings."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in chars]
    chars |= {b: chr(256 + n) for n, b in enumerate(others)}  # the rest shifted past Latin-1
    return dict(sorted(chars.items()))


_CHAR_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}
_TO_LATIN1 = str.maketrans({c: chr(b) for c, b in _CHAR_TO_BYTE.items()})


@dataclass(frozen=True)
class TokenBytes:
    """Every token's bytes, padded: `matrix[t, :lengths[t]]`; ids the tokenizer lacks are empty."""

    matrix: np.ndarray  # [V, L] uint8
    lengths: np.ndarray  # [V] int64


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def token_bytes(tokenizer) -> TokenBytes:
    """Each token's bytes as decode(skip_special_tokens=False) concatenates them.

    Regular tokens map through the inverse of `bytes_to_unicode`; added tokens (special or not)
    decode to their content verbatim, so their bytes are its UTF-8. Raises NotByteLevelError when
    some regular token has a character outside the byte alphabet or the tokenizer's own decode of
    a sample disagrees with the bytes.
    """
    n = len(tokenizer)
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if i < n}
    names = tokenizer.convert_ids_to_tokens(list(range(n)))
    regular = ["" if t is None or i in added else t for i, t in enumerate(names)]
    hint = "the rollout supports byte-level BPE tokenizers (SmolLM2, Qwen2, Llama-3)"
    if bad := set("".join(regular)) - _CHAR_TO_BYTE.keys():
        token = next(i for i, t in enumerate(regular) if bad & set(t))
        raise NotByteLevelError(
            f"{_name(tokenizer)}: token {token} ({regular[token]!r}) is not a byte-level BPE "
            f"token, so strings cannot be matched on the device; {hint}"
        )
    pieces = [t.translate(_TO_LATIN1).encode("latin-1") for t in regular]  # one byte per char
    for i, content in added.items():
        pieces[i] = content.encode("utf-8")
    # the decode of a sample (every added token, a spread of regular ones) must be these bytes
    sample = [*added, *range(0, n, max(1, n // 4096))]
    text = tokenizer.decode(sample, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if text != b"".join(pieces[i] for i in sample).decode("utf-8", errors="replace"):
        raise NotByteLevelError(
            f"{_name(tokenizer)}: decode does not concatenate the tokens' bytes (not byte-level "
            f"BPE), so strings cannot be matched on the device; {hint}"
        )
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=n)
    matrix = np.zeros((n, max(1, int(lengths.max(initial=0)))), dtype=np.uint8)
    flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
    rows = np.repeat(np.arange(n), lengths)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    matrix[rows, cols] = flat
    return TokenBytes(matrix, lengths)


def aho_corasick(patterns: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """The byte automaton: delta [Q, 256] int64 and first [Q] int64 (state 0 = nothing matched).

    A state is the longest suffix of the stream that is a prefix of some pattern; first[q] is the
    smallest index of a pattern that is a suffix of q's string (len(patterns) if none), i.e. the
    first pattern whose occurrence ends at the byte that led to q.
    """
    none = len(patterns)
    children: list[dict[int, int]] = [{}]
    first = [none]
    for k, pattern in enumerate(patterns):
        q = 0
        for b in pattern:
            if b not in children[q]:
                children[q][b] = len(children)
                children.append({})
                first.append(none)
            q = children[q][b]
        first[q] = min(first[q], k)
    delta = np.zeros((len(children), 256), dtype=np.int64)
    fail = [0] * len(children)
    queue = list(children[0].values())
    for b, v in children[0].items():
        delta[0, b] = v
    for u in queue:  # breadth first: fail[u] is shallower, so its row and first are final
        first[u] = min(first[u], first[fail[u]])
        delta[u] = delta[fail[u]]
        for b, v in children[u].items():
            fail[v] = int(delta[fail[u], b])
            delta[u, b] = v
            queue.append(v)
    return delta, np.array(first, dtype=np.int64)


def token_tables(
    delta: np.ndarray, first: np.ndarray, vocab: TokenBytes, none: int, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """Run every token's bytes from every state: next state [Q, V] and first pattern [Q, V].

    Tokens are sorted by length, so byte position j touches only the tokens longer than j (the
    work is Q x total vocabulary bytes), and taken in chunks whose [Q, chunk] arrays stay in
    cache. Measured on 2 shared CPU cores: SmolLM2's 49k vocabulary, "</think>" (9 states): 0.025 s
    (0.09 s with `token_bytes`); a synthetic 152k vocabulary (1.1 MB of token bytes, 33 states):
    0.35 s warm, up to 1 s on a cold first call.
    """
    q, v = len(first), len(vocab.lengths)
    order = np.argsort(-vocab.lengths, kind="stable")
    lengths, matrix = vocab.lengths[order], vocab.matrix[order]
    flat = delta.ravel()  # [Q * 256], indexed by state * 256 + byte
    ends = first[delta].ravel()  # the first pattern an occurrence of which ends at that byte
    next_state = np.empty((q, v), dtype=np.int64)
    which = np.empty((q, v), dtype=np.int64)
    for lo in range(0, v, chunk):
        part = slice(lo, min(lo + chunk, v))
        width = max(1, int(lengths[lo]))  # the longest in the chunk comes first
        by_position = np.ascontiguousarray(matrix[part, :width].T).astype(np.int64)  # [L, n]
        longer = np.searchsorted(-lengths[part], -np.arange(width), "left")  # n with len > j
        state = np.repeat(np.arange(q, dtype=np.int64)[:, None], by_position.shape[1], axis=1)
        best = np.full(state.shape, none, dtype=np.int64)
        for j, n in enumerate(longer.tolist()):  # tokens [:n] of the chunk have a byte at j
            index = state[:, :n] * 256 + by_position[j, :n]
            state[:, :n] = flat[index]
            np.minimum(best[:, :n], ends[index], out=best[:, :n])
        next_state[:, order[part]], which[:, order[part]] = state, best
    return next_state, np.where(which == none, NONE, which)


@dataclass(frozen=True)
class StringAutomaton:
    """Device-side matcher of `strings`; a state per row, [B] int64 on the device.

    Aho-Corasick over all strings together rather than one KMP automaton per string: one state
    per row and one gather per step whatever the number of strings, and its states (at most
    1 + total string bytes) are no more than the KMP automata's together.
    """

    strings: tuple[str, ...]
    # [Q, V + 1, 2]: (next state, first completed string or -1); column V is "no bytes", for ids
    # outside the tokenizer (a padded model vocabulary), which decode to nothing
    table: torch.Tensor

    @classmethod
    def build(cls, tokenizer, strings: Sequence[str], device) -> StringAutomaton:
        """Empty strings are ignored; with none left it never completes."""
        return cls.from_vocab(token_bytes(tokenizer), strings, device)

    @classmethod
    def from_vocab(cls, vocab: TokenBytes, strings: Sequence[str], device) -> StringAutomaton:
        kept = tuple(s for s in strings if s)
        delta, first = aho_corasick([s.encode("utf-8") for s in kept])
        next_state, which = token_tables(delta, first, vocab, len(kept))
        q = len(first)
        empty = np.stack([np.arange(q), np.full(q, NONE)], axis=1)[:, None]  # the padding id
        table = np.concatenate([np.stack([next_state, which], axis=-1), empty], axis=1)
        dtype = torch.int16 if max(q, len(kept)) < 2**15 else torch.int32
        return cls(kept, torch.from_numpy(table).to(device=device, dtype=dtype))

    @property
    def vocab_size(self) -> int:
        return self.table.shape[1] - 1

    def to(self, device) -> StringAutomaton:
        return StringAutomaton(self.strings, self.table.to(device))

    def initial(self, batch: int) -> torch.Tensor:
        """The state of empty transcripts: [B] int64."""
        return torch.zeros(batch, dtype=torch.long, device=self.table.device)

    def step(self, state: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(new state, index into `strings` of the first string the token completes, or -1)."""
        v = self.vocab_size
        tokens = torch.where((tokens >= 0) & (tokens < v), tokens, v)  # unknown ids: no bytes
        hit = self.table[state, tokens].long()  # [B, 2], static shape, stays on the device
        return hit[:, 0], hit[:, 1]

    def advance(
        self, state: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(new state, completed [B] bool: the row's token completes some string)."""
        state, which = self.step(state, tokens)
        return state, which >= 0
