"""The chat template of kiln's OpenAI-compatible chat endpoint: messages in, one prompt out.

tinylm is a plain language model, not one tuned on a chat format, so kiln uses a simple template
of role markers, each on its own line, then the message, and ends the prompt with the marker of the
assistant's turn, which the model continues:

    <|system|>
    You answer in one line.
    <|user|>
    What does len() return?
    <|assistant|>

The model's text up to a new user turn is the answer: "\\n<|user|>" is always a stop string
(besides the request's own), so a model that goes on to write the user's next line stops there.
Roles: "system" (and OpenAI's newer name for it, "developer"), "user", "assistant". A message's
content is a string or a list of text parts ({"type": "text", "text": ...}, joined); an optional
"name" is accepted and not used. Images, audio, tool calls and tool messages are refused
(`ChatError`, naming the offending field as OpenAI's `param`, e.g. "messages[2].role").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

ROLE_MARKER = "<|{role}|>"
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}
"""OpenAI's newer name for the system role."""
ASSISTANT_PROMPT = "<|assistant|>\n"
"""How the prompt ends: the assistant's turn, which the model writes."""
IMPLICIT_STOP = "\n<|user|>"
"""Always a stop string of a chat request: the model must not write the user's next turn."""
MESSAGE_FIELDS = frozenset({"role", "content", "name"})


class ChatError(ValueError):
    """Messages that do not fit the template; `param` names the field (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _content(index: int, content: Any) -> str:
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
        texts = []
        for part_index, part in enumerate(content):
            part_where = f"{where}[{part_index}]"
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise ChatError(
                    f"{part_where} is of type {kind!r}: kiln's chat takes text only "
                    "(a string, or parts {\"type\": \"text\", \"text\": ...})", part_where,
                )
            if not isinstance(part.get("text"), str):
                raise ChatError(f"{part_where}.text must be a string", f"{part_where}.text")
            texts.append(part["text"])
        return "".join(texts)
    raise ChatError(
        f"{where} must be a string or a list of text parts, got {type(content).__name__}", where
    )


def render(messages: Any) -> str:
    """The prompt for `messages` (see the module doc).

    Raises:
        ChatError: Not a non-empty list of messages each with a known role and text content.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes, bytearray)):
        raise ChatError(f"messages must be a list of messages, got {type(messages).__name__}", "messages")
    if not messages:
        raise ChatError("messages must hold at least one message", "messages")
    lines = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise ChatError(f"{where} must be an object with a role and content", where)
        unknown = sorted(set(message) - MESSAGE_FIELDS)
        if unknown:
            raise ChatError(
                f"{where} has field(s) kiln's chat does not take: {', '.join(unknown)} (it takes role, "
                "content and name; tool calls are not supported)", f"{where}.{unknown[0]}",
            )
        role = message.get("role")
        role = ROLE_ALIASES.get(role, role) if isinstance(role, str) else role
        if role not in ROLES:
            raise ChatError(
                f"{where}.role is {message.get('role')!r}: kiln's chat takes the roles system (or "
                "developer), user and assistant", f"{where}.role",
            )
        if "content" not in message or message["content"] is None:
            raise ChatError(f"{where} has no content", f"{where}.content")
        lines.append(f"{ROLE_MARKER.format(role=role)}\n{_content(index, message['content'])}\n")
    return "".join(lines) + ASSISTANT_PROMPT
