"""The Ollama `Modelfile` beside an exported GGUF: a chat template translated to Ollama's Go template.

Jinja chat templates cannot be translated in general, so the template is recognised instead: the
test conversations below are rendered with it, and where every one renders exactly as a known format
(ChatML, Llama 3) renders it, that format's Go template is written (https://github.com/ollama/ollama/
blob/main/docs/template.md), with a SYSTEM line for a system prompt the template adds to conversations
that have none (Ollama puts SYSTEM in front of those). Any other template gets no TEMPLATE line, and
Ollama falls back to the GGUF's own `tokenizer.chat_template`. Prompts trained as plain text get
`{{ .Prompt }}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["Modelfile", "modelfile"]


@dataclass(frozen=True)
class _ChatFormat:
    name: str
    turn: str  # one message, "{role}" and "{content}" standing for its role and text
    generation: str  # what asks for the assistant's reply
    end: str  # the token that ends a turn


_FORMATS = (
    _ChatFormat("chatml", "<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>"),
    _ChatFormat(
        "llama3",
        "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
)

# Conversations a translated template must render exactly as the chat template does.
_CONVERSATIONS = (
    (("user", "Hi there"),),
    (("system", "Be brief."), ("user", "Hi there")),
    (("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye")),
)


@dataclass(frozen=True)
class Modelfile:
    """A Modelfile's text, and the chat format its TEMPLATE came from."""

    text: str
    format: str  # the chat format its TEMPLATE was translated from ("plain"; "none": Ollama guesses)


def modelfile(tokenizer: Any, chat: str | None, stops: list[str], gguf_file: str = "model.gguf") -> Modelfile:
    """The Ollama Modelfile of a GGUF export: its TEMPLATE is the chat template translated to Ollama's
    Go template where it renders as a known format (ChatML, Llama 3) on test conversations, with a
    SYSTEM line for a system prompt the template adds by default; stops are the end-of-turn tokens."""
    lines = [f"# ollama create NAME -f Modelfile, in this directory\nFROM ./{gguf_file}"]
    found = "plain" if chat is None else "none"
    rendered = [] if chat is None else _render(tokenizer, chat)
    if chat is None:
        lines.append('TEMPLATE """{{ .Prompt }}"""')
    for fmt in _FORMATS if rendered else ():
        matched = _match(fmt, rendered, tokenizer)
        if matched is None:
            continue
        lead, system = matched
        turn = fmt.turn.replace("{role}", "{{ .Role }}").replace("{content}", "{{ .Content }}")
        lines.append(f'TEMPLATE """{lead}{{{{- range .Messages }}}}{turn}{{{{ end }}}}{fmt.generation}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
        stops = [*stops, fmt.end]
        found = fmt.name
        break
    if found == "none":
        lines.append("# no TEMPLATE: the chat template is no format tunesmith translates; Ollama reads the GGUF's own")
    lines += [f"PARAMETER stop {json.dumps(stop)}" for stop in dict.fromkeys(stops)]
    return Modelfile("\n".join(lines) + "\n", found)


def _render(tokenizer: Any, chat: str) -> list[str]:
    """The test conversations as `chat` renders them with the generation prompt ([]: it cannot)."""
    from jinja2 import TemplateError

    rendered = []
    try:
        for conversation in _CONVERSATIONS:
            messages = [{"role": role, "content": content} for role, content in conversation]
            text = tokenizer.apply_chat_template(
                messages, chat_template=chat, add_generation_prompt=True, tokenize=False
            )
            rendered.append(str(text))
    except (TemplateError, ValueError):
        return []
    return rendered


def _match(fmt: _ChatFormat, rendered: list[str], tokenizer: Any) -> tuple[str, str | None] | None:
    """(text before the turns, default system prompt) when the test conversations rendered as `fmt`
    renders them, perhaps after a BOS the template writes; None when they did not."""
    bos = tokenizer.bos_token or ""
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    for lead in dict.fromkeys(("", bos)):
        if not all(text.startswith(lead) for text in rendered):
            continue
        texts = [text[len(lead) :] for text in rendered]
        system = _default_system(fmt, texts[0])
        if all(
            text == _emulate(fmt, conversation, system)
            for conversation, text in zip(_CONVERSATIONS, texts, strict=True)
        ):
            return ("" if adds_bos else lead), system  # llama.cpp adds the BOS itself where the tokenizer does
    return None


def _emulate(fmt: _ChatFormat, conversation: tuple[tuple[str, str], ...], system: str | None) -> str:
    """What Ollama renders from `fmt`'s template, SYSTEM `system` going in front of a conversation without one."""
    if system is not None and conversation[0][0] != "system":
        conversation = (("system", system), *conversation)
    return "".join(_turn(fmt, role, content) for role, content in conversation) + fmt.generation


def _default_system(fmt: _ChatFormat, text: str) -> str | None:
    """The system prompt the template put in front of a conversation that had none (None: none)."""
    head, tail = _turn(fmt, "system", "\0").split("\0")
    rest = _turn(fmt, "user", "Hi there") + fmt.generation
    if text.startswith(head) and text.endswith(tail + rest) and len(text) > len(head + tail + rest):
        return text[len(head) : len(text) - len(tail + rest)]
    return None


def _turn(fmt: _ChatFormat, role: str, content: str) -> str:
    return fmt.turn.replace("{role}", role).replace("{content}", content)
