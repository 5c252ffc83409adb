"""Device-side string matching: the automaton and a brute-force byte reference agree."""

from __future__ import annotations

import random

import pytest
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode as hf_bytes_to_unicode

from megatron_softgrpo.errors import UserError
from megatron_softgrpo.rollout.string_automaton import StringAutomaton, token_bytes

MARKER = "</think>"
STRING_SETS = [
    [MARKER],
    [MARKER, "\n\n", "```"],
    # self-overlapping, multi-byte (split over tokens, and inside one token), a special token
    ["<|im_end|>", "abab", "\n\n\n", "思考", "’"],
    # one string inside another: the first in the given order is reported
    ["```", "``", "\n", ">"],
]


def ids_of(tokenizer, *pieces: str) -> list[int]:
    return [t for p in pieces for t in tokenizer(p, add_special_tokens=False)["input_ids"]]


def byte_ids(tokenizer, text: str) -> list[int]:
    """One single-byte token per UTF-8 byte of `text`."""
    chars = hf_bytes_to_unicode()
    return tokenizer.convert_tokens_to_ids([chars[b] for b in text.encode("utf-8")])


def reference_bytes(tokenizer) -> list[bytes]:
    """Each token's bytes, from transformers' own byte map (independent of the module)."""
    to_byte = {c: b for b, c in hf_bytes_to_unicode().items()}
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    names = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [
        added[i].encode() if i in added else bytes(to_byte[c] for c in name)
        for i, name in enumerate(names)
    ]


def reference(pieces: list[bytes], tokens: list[int], strings: list[str]) -> list[int]:
    """Per step, the first string with an occurrence ending inside that token's byte span, or -1."""
    stream = b"".join(pieces[t] for t in tokens)
    ends = [  # the end byte of every occurrence, overlapping ones included
        {p + len(s.encode()) - 1 for p in range(len(stream)) if stream.startswith(s.encode(), p)}
        for s in strings
    ]
    out, start = [], 0
    for t in tokens:
        span = range(start, start + len(pieces[t]))
        out.append(next((k for k, e in enumerate(ends) if any(i in e for i in span)), -1))
        start = span.stop
    return out


def planted(tokenizer) -> list[list[int]]:
    """Marker spellings, splits and near misses to plant between random tokens."""
    return [
        ids_of(tokenizer, MARKER),  # as the tokenizer encodes it: "</", "think", ">"
        ids_of(tokenizer, "</", "think>"),
        ids_of(tokenizer, "\n</think>"),
        ids_of(tokenizer, "</", "think", ">,"),  # ">," carries the end plus trailing text
        ids_of(tokenizer, " </think>\n\n"),
        ids_of(tokenizer, "</", "thinking", ">"),
        byte_ids(tokenizer, "思考"),  # every byte its own token
        ids_of(tokenizer, "思考"),  # two bytes + one byte per character
        ids_of(tokenizer, "’"),  # three bytes in one token
        byte_ids(tokenizer, "’"),
        [tokenizer.convert_tokens_to_ids("<|im_end|>")],  # the special token
        ids_of(tokenizer, "<|", "im", "_", "end", "|>"),  # its text in regular tokens
        ids_of(tokenizer, "abab", "ab", "a"),
        ids_of(tokenizer, "\n", "\n\n", "\n"),
        ids_of(tokenizer, "``", "`", "```", "``"),
    ]


def random_rows(tokenizer, rows: int, steps: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    plants = planted(tokenizer)
    near = ids_of(tokenizer, "<", "/", "t", "h", "k", ">", "\n", "`", "a", "b", " ", "\n\n")
    out = []
    for _ in range(rows):
        row: list[int] = []
        while len(row) < steps:
            kind = rng.random()
            if kind < 0.4:
                row += rng.choice(plants)
            elif kind < 0.7:
                row.append(rng.choice(near))
            else:
                row.append(rng.randrange(len(tokenizer)))
        out.append(row[:steps])
    return out


@pytest.mark.parametrize("strings", STRING_SETS, ids=lambda s: "|".join(map(repr, s)))
def test_automaton_and_reference_agree(tokenizer, strings):
    pieces = reference_bytes(tokenizer)
    rows = random_rows(tokenizer, rows=48, steps=40, seed=len(strings))
    for row in rows:  # the reference's bytes are what decode concatenates
        text = tokenizer.decode(row, skip_special_tokens=False)
        assert text == b"".join(pieces[t] for t in row).decode("utf-8", errors="replace")
    expected = [reference(pieces, row, strings) for row in rows]
    assert sum(k >= 0 for r in expected for k in r) > 40  # plenty of completions to compare

    automaton = StringAutomaton.build(tokenizer, strings, "cpu")
    tokens = torch.tensor(rows)
    state, got = automaton.initial(len(rows)), []
    for t in range(tokens.shape[1]):
        new, which = automaton.step(state, tokens[:, t])
        state, completed = automaton.advance(state, tokens[:, t])
        assert torch.equal(new, state) and torch.equal(completed, which >= 0)
        got.append(which)
    assert torch.stack(got, 1).tolist() == expected


def test_lone_sub_tokens_never_complete_the_marker(tokenizer):
    automaton = StringAutomaton.build(tokenizer, [MARKER], "cpu")
    pieces = token_bytes(tokenizer)
    subs = [
        t
        for t in range(len(tokenizer))
        if 0 < pieces.lengths[t] < len(MARKER)
        and bytes(pieces.matrix[t, : pieces.lengths[t]]).decode(errors="replace") in MARKER
    ]
    assert len(subs) > 10 and ids_of(tokenizer, "</")[0] in subs
    prefix = ids_of(tokenizer, "so")  # after ordinary text as well as at the start
    for before in ([], prefix):
        state = automaton.initial(len(subs))
        for t in before:
            state, _ = automaton.advance(state, torch.full((len(subs),), t))
        _, completed = automaton.advance(state, torch.tensor(subs))
        assert not completed.any()
    # the whole marker in one step does complete (the special-token spelling, as a string)
    special = StringAutomaton.build(tokenizer, ["<|im_end|>"], "cpu")
    assert special.advance(special.initial(1), torch.tensor([2]))[1].item()


def test_empty_strings_and_ids_outside_the_tokenizer(tokenizer):
    none = StringAutomaton.build(tokenizer, ["", ""], "cpu")
    assert none.strings == ()
    state = none.initial(3)
    for t in ids_of(tokenizer, MARKER):
        state, completed = none.advance(state, torch.full((3,), t))
        assert not completed.any()
    automaton = StringAutomaton.build(tokenizer, ["", MARKER], "cpu")
    assert automaton.strings == (MARKER,) and automaton.vocab_size == len(tokenizer)
    # ids a padded model vocabulary may emit decode to nothing: they neither match nor break one
    head, tail = ids_of(tokenizer, "</think"), ids_of(tokenizer, ">")
    for pad in (len(tokenizer), len(tokenizer) + 100, -1):
        state = automaton.initial(1)
        for t in [*head, pad, *tail]:
            state, completed = automaton.advance(state, torch.tensor([t]))
        assert completed.item()


def test_advance_is_one_graph_with_no_host_sync(tokenizer):
    automaton = StringAutomaton.build(tokenizer, [MARKER, "\n\n"], "cpu")
    # fullgraph: a host sync (.item(), .tolist(), data-dependent shapes) would be a graph break
    compiled = torch.compile(automaton.advance, fullgraph=True, backend="eager", dynamic=False)
    tokens = torch.tensor(random_rows(tokenizer, rows=8, steps=24, seed=7))
    eager_state = compiled_state = automaton.initial(8)
    for t in range(tokens.shape[1]):
        eager_state, eager_done = automaton.advance(eager_state, tokens[:, t])
        compiled_state, compiled_done = compiled(compiled_state, tokens[:, t])
        assert torch.equal(eager_state, compiled_state) and torch.equal(eager_done, compiled_done)
    # on the meta device no value can reach the host: the step runs there, states stay there
    meta = automaton.to("meta")
    state, completed = meta.advance(meta.initial(8), tokens[:, 0].to("meta"))
    assert state.device.type == completed.device.type == "meta"
    assert state.shape == completed.shape == (8,) and completed.dtype == torch.bool


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_advance_replays_in_a_cuda_graph(tokenizer):
    automaton = StringAutomaton.build(tokenizer, [MARKER, "\n\n"], "cuda")
    rows = torch.tensor(random_rows(tokenizer, rows=8, steps=24, seed=8), device="cuda")
    state, token = automaton.initial(8), rows[:, 0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        automaton.advance(state, token)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        new, completed = automaton.advance(state, token)
    eager = automaton.initial(8)
    for t in range(rows.shape[1]):
        token.copy_(rows[:, t])
        graph.replay()
        eager, eager_done = automaton.advance(eager, rows[:, t])
        assert torch.equal(new, eager) and torch.equal(completed, eager_done)
        state.copy_(new)


class FakeSentencePiece:
    """A SentencePiece-style vocabulary: "▁" marks a space, bytes are "<0x..>" tokens."""

    name_or_path = "fake/sentencepiece"
    added_tokens_decoder: dict = {}
    vocab = ["<unk>", "\u2581the", "<0x0A>", "re"]

    def __len__(self) -> int:
        return len(self.vocab)

    def convert_ids_to_tokens(self, ids):
        return [self.vocab[i] for i in ids]

    def decode(self, ids, **kwargs) -> str:
        text = "".join(self.vocab[i] for i in ids)
        return text.replace("\u2581", " ").replace("<0x0A>", "\n")


class FakeWordPiece(FakeSentencePiece):
    """Every character is in the byte alphabet, but decode does not concatenate the tokens."""

    name_or_path = "fake/wordpiece"
    vocab = ["the", "##re", "[SEP]"]

    def decode(self, ids, **kwargs) -> str:
        return " ".join(self.vocab[i] for i in ids).replace(" ##", "")


@pytest.mark.parametrize(
    "fake", [FakeSentencePiece(), FakeWordPiece()], ids=lambda f: f.name_or_path
)
def test_a_tokenizer_that_is_not_byte_level_is_refused(fake):
    with pytest.raises(UserError) as error:
        StringAutomaton.build(fake, [MARKER], "cpu")
    message = str(error.value)
    assert "\n" not in message and fake.name_or_path in message
    assert "byte-level BPE tokenizers" in message
