"""A readable view of soft thinking: each soft step's top slots and their mixture weights."""

from __future__ import annotations


def format_soft_steps(result, row: int, tokenizer, top: int = 3) -> str:
    records = result.records
    start = int(result.prompt_lengths[row])
    lines = []
    for t in range(int(result.response_lengths[row])):
        j = start + t
        if not bool(records.is_soft[row, j]):
            kind = "forced" if not bool(result.loss_mask[row, j]) else "discrete"
            lines.append(f"{t:4d} {kind:>8}  {tokenizer.decode([int(records.tokens[row, j])])!r}")
            continue
        slots = [
            f"{tokenizer.decode([int(i)])!r}:{float(w):.2f}"
            for i, w, s in zip(
                records.mix_ids[row, j], records.mix_weights[row, j], records.support[row, j]
            )
            if bool(s)
        ][:top]
        lines.append(f"{t:4d}     soft  " + "  ".join(slots))
    return "\n".join(lines)
