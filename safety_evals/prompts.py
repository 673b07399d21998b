"""The exact text a model sees for an item: the suite's wrapper and system prompt, through the
tokenizer's chat template when the suite asks for it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .suite import Suite


def render_prompt(tokenizer, suite: Suite, item: dict) -> str:
    """The exact text the model sees for a `generate` item."""
    user = suite.prompting.wrapper.replace("{prompt}", item["prompt"])
    system = item.get("system") or suite.prompting.system_prompt
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if suite.prompting.chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
