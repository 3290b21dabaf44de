"""SFT records (chat, prompt/completion, Alpaca, text), their bad rows, and rendering to ids and targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import CHATML, make_tiny_byte_tokenizer, write_jsonl
from tunesmith.data.readers import Row, read_rows
from tunesmith.data.sft import Message, SftExample, to_sft_examples
from tunesmith.data.templates import (
    FALLBACK_CHAT_TEMPLATE,
    Encoded,
    encode_example,
    encode_examples,
    encode_prompt,
    resolve_template,
)
from tunesmith.errors import ConfigError, DataError

START, END = 1, 2  # <|im_start|> (also the BOS) and <|im_end|> (EOS and pad) of the byte tokenizer
NL = [201]


def _b(text: str) -> list[int]:
    """Ids of the conftest byte tokenizer, by hand: '!'..'~' are 3..96, newline 201, space 223."""
    table = {"\n": 201, " ": 223}
    return [table[c] if c in table else ord(c) - 30 for c in text]


def _rows(*records: dict[str, Any]) -> list[Row]:
    return [Row(dict(r), f"d.jsonl:{i}") for i, r in enumerate(records, start=1)]


def _chat(*turns: tuple[str, str] | tuple[str, str, int], where: str = "d.jsonl:1") -> SftExample:
    return SftExample(tuple(Message(*turn) for turn in turns), where=where)  # type: ignore[arg-type]


def _prompt(prompt: str, completion: str, where: str = "d.jsonl:1") -> SftExample:
    return SftExample((Message("user", prompt), Message("assistant", completion)), kind="prompt", where=where)


def _trained_text(encoded: Encoded, tokenizer: Any) -> str:
    return tokenizer.decode([i for i, t in zip(encoded.input_ids, encoded.targets, strict=True) if t])


@pytest.fixture()
def tok() -> Any:
    return make_tiny_byte_tokenizer()


# ----------------------------------------------------------------------------- formats


def test_each_format_parses() -> None:
    rows = _rows(
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "yo", "weight": 0}, {"role": "user", "content": "and?"},
                      {"role": "assistant", "content": "ok"}]},
        {"prompt": "2+2=", "completion": " 4", "extra": 1},
        {"instruction": "Add", "input": "2 and 2", "output": "4"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
        {"instruction": "Say hi", "output": "hi"},
        {"instruction": "Add", "input": float("nan"), "output": "4"},  # a missing value in a pandas-written file
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": " a ", "weight": None}]},
        {"text": "  Once upon a time\n"},
    )  # fmt: skip
    assert to_sft_examples(rows) == [
        _chat(("system", "be brief"), ("user", "hi"), ("assistant", "yo", 0), ("user", "and?"), ("assistant", "ok")),
        _prompt("2+2=", " 4", "d.jsonl:2"),
        _prompt("Add\n\n2 and 2", "4", "d.jsonl:3"),
        _prompt("Say hi", "hi", "d.jsonl:4"),
        _prompt("Say hi", "hi", "d.jsonl:5"),
        _prompt("Add", "4", "d.jsonl:6"),
        _chat(("user", ""), ("assistant", " a "), where="d.jsonl:7"),
        SftExample((), text="  Once upon a time\n", kind="text", where="d.jsonl:8"),
    ]


def test_inputs_for_generation_need_no_completion() -> None:
    rows = _rows(
        {"prompt": "2+2="},
        {"instruction": "Add", "input": None, "output": None},
        {"messages": [{"role": "user", "content": "hi"}]},
        {"prompt": "p", "completion": "c"},
    )
    assert to_sft_examples(rows, require_completion=False) == [
        SftExample((Message("user", "2+2="),), kind="prompt", where="d.jsonl:1"),
        SftExample((Message("user", "Add"),), kind="prompt", where="d.jsonl:2"),
        _chat(("user", "hi"), where="d.jsonl:3"),
        _prompt("p", "c", "d.jsonl:4"),
    ]


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "yo"}


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"question": "q", "answer": "a"}, ["no SFT format matches", "fields present: question, answer", "prompt"]),
        ({"messages": [USER, {"role": "tool", "content": "42"}, ASSISTANT]}, ["messages[1] has role 'tool'", "only"]),
        ({"messages": [USER, {"role": "function", "content": "f"}]}, ["function messages are not supported"]),
        ({"messages": [{"role": "bot", "content": "x"}, ASSISTANT]}, ["role 'bot'", "'system', 'user'"]),
        ({"messages": [{"content": "x"}, ASSISTANT]}, ["messages[0] has no 'role'"]),
        ({"messages": [USER, {"role": "assistant", "content": None}]}, ["messages[1] (assistant) has no 'content'"]),
        ({"messages": [USER, {"role": "assistant"}]}, ["has no 'content'"]),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}, ASSISTANT]}, ["must be a string"]),
        ({"messages": [USER, {"role": "assistant", "content": " \n"}]}, ["empty assistant message"]),
        ({"messages": [USER, {**ASSISTANT, "tool_calls": [{"id": "1"}]}]}, ["tool/function calls"]),
        ({"messages": [USER]}, ["no assistant message"]),
        ({"messages": [USER, {**ASSISTANT, "weight": 2}]}, ["weight 2", "0 (not trained) or 1"]),
        ({"messages": [USER, {**ASSISTANT, "weight": True}]}, ["weight True"]),
        ({"messages": "hi"}, ["'messages' must be a non-empty list of objects"]),
        ({"messages": []}, ["non-empty list"]),
        ({"messages": ["hi"]}, ["list of objects"]),
        ({"prompt": "p"}, ["missing field 'completion'"]),
        ({"completion": "c"}, ["missing field 'prompt'"]),
        ({"prompt": "p", "completion": "  "}, ["empty 'completion'"]),
        ({"prompt": "p", "completion": 4}, ["field 'completion' must be a string, got int"]),
        ({"prompt": None, "completion": "c"}, ["field 'prompt' must be a string, got NoneType"]),
        ({"instruction": "i", "output": ""}, ["empty 'output'"]),
        ({"instruction": "i", "input": 3, "output": "o"}, ["field 'input' must be a string"]),
        ({"output": "o"}, ["missing field 'instruction'"]),
        ({"text": " "}, ["empty 'text'"]),
        ({"text": 1}, ["field 'text' must be a string"]),
    ],
)
def test_bad_rows_name_the_line_and_the_fix(record: dict[str, Any], expected: list[str]) -> None:
    with pytest.raises(DataError) as info:
        to_sft_examples(_rows({"text": "fine"}, record))
    message = str(info.value)
    assert message.startswith("1 problem(s)")
    assert "d.jsonl:2: " in message and "d.jsonl:1" not in message
    for part in expected:
        assert part in message


def test_every_bad_row_in_one_error_first_20_shown() -> None:
    rows = _rows(*[{"text": ""} for _ in range(23)], {"text": "ok"}, {"messages": [USER]})
    with pytest.raises(DataError) as info:
        to_sft_examples(rows)
    lines = str(info.value).splitlines()
    assert lines[0].startswith("24 problem(s)")
    assert lines[1].startswith("  d.jsonl:1: empty 'text'")
    assert len(lines) == 1 + 20 + 1 and lines[-1] == "  ... and 4 more"


def test_errors_name_the_file_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}, {"prompt": "p"}])
    with pytest.raises(DataError, match=rf"{path}:2: missing field 'completion'"):
        to_sft_examples(read_rows(path))


# ----------------------------------------------------------------------------- encoding


def test_chat_ids_and_targets_by_hand(tok: Any) -> None:
    encoded = encode_example(_chat(("user", "hi"), ("assistant", "yo")), tok, "chat")
    prompt = [START, *_b("user\nhi"), END, *NL, START, *_b("assistant\n")]
    reply = [*_b("yo"), END, *NL]  # the content and the end-of-turn marker; EOS already there, none appended
    assert encoded == Encoded(prompt + reply, [0] * len(prompt) + [1] * len(reply), "d.jsonl:1")


def test_weight_zero_masks_exactly_that_turn(tok: Any) -> None:
    example = _chat(("system", "s"), ("user", "a"), ("assistant", "x1", 0), ("user", "b"), ("assistant", "x2"))
    encoded = encode_example(example, tok, "chat")
    assert tok.decode(encoded.input_ids) == tok.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in example.messages], tokenize=False
    )
    assert _trained_text(encoded, tok) == "x2<|im_end|>\n"
    trained = [i for i, t in enumerate(encoded.targets) if t]
    assert trained == list(range(len(encoded.input_ids) - 4, len(encoded.input_ids)))  # x 2 <|im_end|> \n

    both = encode_example(
        _chat(("system", "s"), ("user", "a"), ("assistant", "x1"), ("user", "b"), ("assistant", "x2")), tok, "chat"
    )
    assert both.input_ids == encoded.input_ids
    assert _trained_text(both, tok) == "x1<|im_end|>\nx2<|im_end|>\n"


def test_plain_prompt_row_appends_a_trained_eos_though_pad_is_eos(tok: Any) -> None:
    assert tok.pad_token_id == tok.eos_token_id == END
    encoded = encode_example(_prompt("2+2=", " 4"), tok, "plain")
    assert encoded.input_ids == [*_b("2+2="), *_b(" 4"), END]
    assert encoded.targets == [0, 0, 0, 0, 1, 1, 1]


def test_plain_prompt_gets_the_tokenizers_bos_and_the_completion_none(tok: Any) -> None:
    from tokenizers import processors

    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", START)]
    )
    encoded = encode_example(_prompt("ab", "cd"), tok, "plain")
    assert encoded.input_ids == [START, *_b("ab"), *_b("cd"), END]
    assert encoded.targets == [0, 0, 0, 1, 1, 1]
    assert encode_prompt("ab", tok, "plain") == encoded.input_ids[:3]


def test_text_rows_train_every_token_but_the_first(tok: Any) -> None:
    for template in ("chat", "plain"):
        encoded = encode_example(SftExample((), text=" ab\n", kind="text"), tok, template)  # type: ignore[arg-type]
        assert encoded.input_ids == [*_b(" ab\n"), END]
        assert encoded.targets == [0, 1, 1, 1, 1]


def test_fallback_template_when_the_tokenizer_has_none(tok: Any) -> None:
    bare = make_tiny_byte_tokenizer(chat_template=None)
    example = _chat(("system", "s"), ("user", "hi"), ("assistant", "yo"))
    assert encode_example(example, bare, "chat") == encode_example(example, tok, "chat")
    assert bare.chat_template is None  # the caller's tokenizer is left as it was
    assert encode_prompt("hi", bare, "chat") == encode_prompt("hi", tok, "chat")


def test_auto_renders_prompt_rows_plain_and_chat_rows_with_the_fallback() -> None:
    bare = make_tiny_byte_tokenizer(chat_template=None)
    assert resolve_template(bare, "auto") == "plain"
    assert resolve_template(make_tiny_byte_tokenizer(), "auto") == "chat"
    assert resolve_template(bare, "chat") == "chat" and resolve_template(make_tiny_byte_tokenizer(), "plain") == "plain"
    chat, prompt = _chat(("user", "hi"), ("assistant", "yo")), _prompt("ab", "cd", "d.jsonl:2")
    encoded, _ = encode_examples([chat, prompt], bare, "auto", False, 100, "error")
    assert encoded == [encode_example(chat, bare, "chat"), encode_example(prompt, bare, "plain")]
    assert encoded[1].input_ids == [*_b("abcd"), END]
    with pytest.raises(DataError, match=r"d.jsonl:1: a chat \('messages'\) row .* data.template: chat"):
        encode_examples([chat, prompt], bare, "plain", False, 100, "error")


def test_template_ending_turns_with_another_token_gets_eos_after_the_last_trained_turn(tok: Any) -> None:
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] + ':' + m['content'] + '<|endoftext|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
    )
    example = _chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d", 0), ("user", "e"))
    encoded = encode_example(example, tok, "chat")
    eot = 0  # <|endoftext|>
    turns = [*_b("user:a"), eot, *_b("assistant:b"), eot, END, *_b("user:c"), eot]
    assert encoded.input_ids == [*turns, *_b("assistant:d"), eot, *_b("user:e"), eot]
    assert _trained_text(encoded, tok) == "b<|endoftext|><|im_end|>"


def test_encode_prompt_is_exactly_what_training_saw(tok: Any, tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    auto_tok = AutoTokenizer.from_pretrained(tiny_llama)
    example = _chat(("system", "sys"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"))
    for tokenizer in (tok, auto_tok):
        encoded = encode_example(example, tokenizer, "chat")
        starts = [i for i in range(1, len(encoded.targets)) if encoded.targets[i] and not encoded.targets[i - 1]]
        assistants = [i for i, m in enumerate(example.messages) if m.role == "assistant"]
        assert len(starts) == len(assistants) == 2
        for start, index in zip(starts, assistants, strict=True):
            assert encode_prompt(example.messages[:index], tokenizer, "chat") == encoded.input_ids[:start]
    single = encode_example(_prompt("what?", "this"), auto_tok, "chat")
    prompt = encode_prompt("what?", auto_tok, "chat")
    assert prompt == [START, *_b("user\nwhat?"), END, *NL, START, *_b("assistant\n")]
    assert single.input_ids[: len(prompt)] == prompt and single.targets[len(prompt)] == 1
    with pytest.raises(DataError, match="needs a chat template"):
        encode_prompt(example.messages, tok, "plain")


def test_train_on_prompt_trains_all_but_weight_zero_turns(tok: Any) -> None:
    example = _chat(("user", "a"), ("assistant", "x", 0), ("user", "b"), ("assistant", "y"))
    base = encode_example(example, tok, "chat")
    encoded = encode_example(example, tok, "chat", train_on_prompt=True)
    assert encoded.input_ids == base.input_ids
    untrained = [i for i, t in enumerate(encoded.targets) if not t]
    x_turn = encode_prompt(example.messages[:1], tok, "chat")
    assert untrained == [0, *range(len(x_turn), len(x_turn) + len(_b("x")) + 2)]  # x <|im_end|> \n


def test_overlong_rows_truncate_drop_or_error(tok: Any) -> None:
    short, long = _prompt("ab", "cd"), _prompt("abcdef", "ghij", "d.jsonl:2")  # 5 and 11 tokens with the EOS
    encoded, counts = encode_examples([short, long], tok, "plain", False, 8, "truncate")
    assert [e.input_ids for e in encoded] == [[*_b("abcd"), END], _b("abcdefgh")]
    assert encoded[1].targets == [0] * 6 + [1, 1]
    assert counts == {"rows": 2, "truncated": 1, "dropped_overlong": 0, "no_trainable_token": 0, "kept": 2}

    encoded, counts = encode_examples([short, long], tok, "plain", False, 8, "drop")
    assert [e.where for e in encoded] == ["d.jsonl:1"]
    assert counts == {"rows": 2, "truncated": 0, "dropped_overlong": 1, "no_trainable_token": 0, "kept": 1}

    encoded, counts = encode_examples([short, long], tok, "plain", False, 11, "error")
    assert counts["kept"] == 2 and len(encoded[1].input_ids) == 11
    with pytest.raises(DataError) as info:
        encode_examples([short, long, long], tok, "plain", False, 8, "error")
    message = str(info.value)
    assert message.startswith("2 row(s) longer than data.max_length (8 tokens)")
    assert "d.jsonl:2: 11 tokens" in message and "d.jsonl:1" not in message
    assert "raise data.max_length" in message and "data.overlong: truncate" in message


def test_rows_without_a_trainable_token_are_removed_and_counted(tok: Any) -> None:
    all_zero = _chat(("user", "a"), ("assistant", "b", 0))
    cut = _prompt("a" * 40, "ij", "d.jsonl:2")  # the chat row is 23 tokens
    fine = _prompt("a", "b", "d.jsonl:3")
    bare = make_tiny_byte_tokenizer(chat_template=None)
    encoded, counts = encode_examples([all_zero, cut, fine], bare, "auto", False, 40, "truncate")
    assert [e.where for e in encoded] == ["d.jsonl:3"]
    assert counts == {"rows": 3, "truncated": 1, "dropped_overlong": 0, "no_trainable_token": 2, "kept": 1}


def test_single_token_row_has_no_target(tok: Any) -> None:
    encoded, counts = encode_examples([SftExample((), text="a", kind="text")], tok, "auto", False, 1, "truncate")
    assert encoded == [] and counts["no_trainable_token"] == 1


def test_template_that_rewrites_earlier_turns_raises(tok: Any) -> None:
    tok.chat_template = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(DataError, match=r"d.jsonl:1: the chat template renders earlier turns differently.*plain"):
        encode_example(_chat(("user", "a"), ("assistant", "b")), tok, "chat")


def test_template_errors_become_data_errors(tok: Any) -> None:
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(DataError, match=r"d.jsonl:1: the chat template cannot render.*roles must alternate"):
        encode_example(_chat(("user", "a"), ("assistant", "b")), tok, "chat")


def test_bad_settings_raise_config_errors(tok: Any) -> None:
    with pytest.raises(ConfigError, match="data.max_length"):
        encode_examples([], tok, "chat", False, 0, "drop")
    with pytest.raises(ConfigError, match="data.overlong"):
        encode_examples([], tok, "chat", False, 8, "cut")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="data.template"):
        resolve_template(tok, "jinja")  # type: ignore[arg-type]


def test_chatml_fixture_matches_fallback_output(tok: Any) -> None:
    conversation = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert tok.chat_template == CHATML
    ours = tok.apply_chat_template(conversation, chat_template=FALLBACK_CHAT_TEMPLATE, tokenize=False)
    assert ours == tok.apply_chat_template(conversation, tokenize=False)
