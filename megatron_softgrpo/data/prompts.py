"""Prompt construction: the recipe's template as the user turn, through the tokenizer's chat template."""

from __future__ import annotations


def render_prompt(tokenizer, problem: str, template: str, system_prompt: str | None = None) -> str:
    """docs/algorithm.md section 6: `template.format(problem=...)` as the user turn, plus the generation prompt."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    messages.append({"role": "user", "content": template.format(problem=problem)})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(
    tokenizer, problem: str, template: str, system_prompt: str | None = None
) -> list[int]:
    text = render_prompt(tokenizer, problem, template, system_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]
