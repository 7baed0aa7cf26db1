"""A tokenizer-free token estimate shared by the gateway and the simulated engine.

Real engines report real usage, which is what Fairway charges; this estimate is only for what
must be known before an engine answers (admission, routing) and for the simulated engine, which
has no vocabulary. English BPE vocabularies average close to four bytes per token.
"""

from __future__ import annotations

from typing import Any

BYTES_PER_TOKEN = 4
# Chat templates wrap every message in role markers; OpenAI's cookbook counts 3 per message
# plus 3 to prime the reply for its chat models.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


def text_tokens(text: str) -> int:
    if not text:
        return 0
    return max(1, -(-len(text.encode()) // BYTES_PER_TOKEN))


def content_tokens(content: Any) -> int:
    """Tokens of a chat message's content: a string or a list of typed parts."""
    if isinstance(content, str):
        return text_tokens(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    total += text_tokens(text)
        return total
    return 0


def chat_prompt_tokens(messages: list[Any]) -> int:
    total = TOKENS_PER_REPLY
    for msg in messages:
        if isinstance(msg, dict):
            total += TOKENS_PER_MESSAGE + content_tokens(msg.get("content"))
    return total


def completion_prompt_tokens(prompt: Any) -> int:
    """Tokens of a completions `prompt`: a string, a list of strings, or token ids."""
    if isinstance(prompt, str):
        return text_tokens(prompt)
    if isinstance(prompt, list):
        if all(isinstance(x, int) for x in prompt):
            return len(prompt)
        return sum(completion_prompt_tokens(x) for x in prompt)
    return 0
