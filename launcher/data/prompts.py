"""Rows -> prompts and targets: each format's prompt builder and the chat template, torch-free.

`validate` and `train` build every row's prompt with this same code: validate with the template read
from the model folder's tokenizer files (no tokenizer object, no torch), train with the one its loaded
tokenizer carries. So a row the template cannot render (a turn it cannot read, a role order it
refuses) is named at its row by validate, not met as a jinja traceback mid-run.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from launcher.errors import UserError
from launcher.model import loading as modeling
from launcher.recipe.schema import DataSection, Recipe

# The prompt of an instruction row when no chat template applies (Stanford Alpaca's layout).
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n{input}### Response:\n"
ALPACA_INPUT = "### Input:\n{input}\n\n"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

Segments = list[tuple[str, bool]] | list[dict]


class RowError(UserError):
    """A row the prompt cannot be built from; `position` is its index in the batch being encoded."""

    def __init__(self, position: int, message: str):
        super().__init__(message)
        self.position = position


# ---------------------------------------------------------------- formats to segments

def _pair(prompt: str, completion: str, use_chat: bool, system: str | None) -> Segments:
    """A prompt and its target as chat messages (system first, when there is one) or as (text, trained) segments."""
    if use_chat:
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return [(prompt, False), (completion, True)]


def _instruction(row: dict, data: DataSection, use_chat: bool) -> Segments:
    """A row's own `system` text overrides data.system_prompt; without a chat template it is the first paragraph."""
    col = data.field
    instruction, extra, output = row[col("instruction")], row.get(col("input")) or "", row[col("output")]
    system = row.get(col("system")) or None
    if use_chat:
        return _pair(f"{instruction}\n\n{extra}" if extra else instruction, output, True, system or data.system_prompt)
    prompt = ALPACA_PROMPT.format(instruction=instruction, input=ALPACA_INPUT.format(input=extra) if extra else "")
    return _pair(f"{system}\n\n{prompt}" if system else prompt, output, False, None)


def _qa(row: dict, data: DataSection, use_chat: bool) -> Segments:
    col = data.field
    context = row.get(col("context")) or ""
    prompt = data.qa_template.format(question=row[col("question")], context=f"Context: {context}\n" if context else "")
    return _pair(prompt if use_chat else prompt + "\n", row[col("answer")], use_chat, data.system_prompt)


def _translation(row: dict, data: DataSection, use_chat: bool) -> Segments:
    prompt = data.prompt_template.format(source_lang=data.source_lang, target_lang=data.target_lang,
                                         source=row[data.field("source")])
    return _pair(prompt if use_chat else prompt + "\n", row[data.field("target")], use_chat, data.system_prompt)


def _completion(row: dict, data: DataSection, use_chat: bool) -> Segments:
    return _pair(row[data.field("prompt")], row[data.field("completion")], use_chat, data.system_prompt)


def _preference(row: dict, data: DataSection, use_chat: bool) -> Segments:
    """The prompt and its chosen reply (the rejected one goes through here as a twin row: data/preference.py)."""
    col = data.field
    system = row.get(col("system")) or data.system_prompt
    prompt = row[col("prompt")]
    if not use_chat and system:
        prompt = f"{system}\n\n{prompt}"
    return _pair(prompt, row[col("chosen")], use_chat, system)


# Format name -> (row, data settings, chat template applies) -> chat messages or (text, trained) segments.
# Chat rows are already messages; plain text is trained whole, template or not.
PROMPT_BUILDERS: dict[str, Callable[[dict, DataSection, bool], Segments]] = {
    "instruction": _instruction,
    "chat": lambda row, data, use_chat: row[data.field("messages")],
    "translation": _translation,
    "completion": _completion,
    "text": lambda row, data, use_chat: [(row[data.field("text")], True)],
    "qa": _qa,
    "preference": _preference,
    "chat-preference": lambda row, data, use_chat: [*row[data.field("messages")],
                                                   {"role": "assistant", "content": row[data.field("chosen")]}],
}


def to_segments(row: dict, data: DataSection, use_chat: bool) -> Segments:
    """A row as chat messages (when the chat template applies) or as (text, trained) segments."""
    return PROMPT_BUILDERS[data.format](row, data, use_chat)


def chat_segments(messages: list[dict], render: Callable[[list[dict], bool], str]) -> list[tuple[str, bool]]:
    """Render a conversation with `render(turns, add_generation_prompt)`; each assistant reply (and its end tag) is trained."""
    segments, done = [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = render(messages[:index], True), render(messages[: index + 1], False)
        if not before.startswith(done) or not after.startswith(before):
            raise UserError("the tokenizer's chat template does not render turns as prefixes of each other; "
                            "set data.chat_template: never")
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    ends_on_reply = messages and messages[-1]["role"] == "assistant"  # then `done` is the whole render
    tail = "" if ends_on_reply else render(messages, False)[len(done):]
    return segments + ([(tail, False)] if tail else [])


# ---------------------------------------------------------------- the chat template, with or without a tokenizer

@dataclass(frozen=True)
class ChatTemplate:
    """A chat template and the special tokens it may name, rendered as transformers' `apply_chat_template`
    renders it (keys whose value is null dropped, the special tokens passed in) by transformers' own renderer."""

    text: str
    specials: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of_tokenizer(cls, tokenizer) -> "ChatTemplate | None":
        if not getattr(tokenizer, "chat_template", None):
            return None
        return cls(tokenizer.get_chat_template(), tuple(sorted(tokenizer.special_tokens_map.items())))

    def render(self, turns: list[dict], prompt: bool) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template
        if not turns:
            raise ValueError("the template is given no turn before the first assistant reply")
        plain = [{key: value for key, value in turn.items() if value is not None} for turn in turns]
        rendered, _ = render_jinja_template([plain], chat_template=self.text, add_generation_prompt=prompt,
                                            **dict(self.specials))
        return rendered[0]

    def segments(self, messages: list[dict]) -> list[tuple[str, bool]]:
        """chat_segments with this template; whatever the template's own code raises becomes one line."""
        try:
            return chat_segments(messages, self.render)
        except UserError:
            raise
        except Exception as exc:  # the template is code shipped with the model: any error of it is about this row
            reason = (str(exc).strip().splitlines() or [""])[0]
            raise UserError(f"the chat template cannot render this row ({type(exc).__name__}: {reason})") from None


def prompt_problem(row: dict, data: DataSection, template: ChatTemplate | None, task: str) -> str | None:
    """What stops this (checked) row's prompt from being built as train builds it; None when it builds."""
    if data.format not in PROMPT_BUILDERS:  # a classifier's rows are tokenised as they are
        return None
    use_chat = template is not None and data.chat_template == "auto" and task == "causal-lm"
    parts = to_segments(row, data, use_chat)
    if parts and isinstance(parts[0], dict) and template is not None:
        try:
            template.segments(parts)
        except UserError as exc:
            return f"{data.field('messages') if data.format == 'chat' else 'prompt'}: {exc}"
    return None


def recipe_template(recipe: Recipe) -> ChatTemplate | None:
    """The chat template train's tokenizer will carry, read from the model's files without loading anything;
    None when the model has none, or its files are not here yet (a hub model not downloaded)."""
    folder = _tokenizer_folder(recipe)
    if folder is None:
        return None
    if folder.suffix == ".gguf":
        return _gguf_template(folder)
    config = _json(folder / "tokenizer_config.json")
    text = (folder / "chat_template.jinja").read_text() if (folder / "chat_template.jinja").is_file() else \
        config.get("chat_template") or _json(folder / "chat_template.json").get("chat_template")
    if isinstance(text, list):  # named templates: the default one is what apply_chat_template uses
        text = next((item.get("template") for item in text if item.get("name") == "default"), None)
    if not text:
        return None
    specials = {**config, **_json(folder / "special_tokens_map.json")}
    found = {key: _token_text(specials[key]) for key in SPECIAL_TOKENS if specials.get(key) is not None}
    return ChatTemplate(text, tuple(sorted(found.items())))


def has_tokenizer_files(recipe: Recipe) -> bool:
    """Whether the model's tokenizer is here to read (so a missing chat template is known missing)."""
    folder = _tokenizer_folder(recipe)
    return folder is not None and (folder.suffix == ".gguf" or (folder / "tokenizer_config.json").is_file())


def _tokenizer_folder(recipe: Recipe) -> Path | None:
    """The folder holding the tokenizer files (or the GGUF file itself when it was not converted yet)."""
    path = recipe.model.path
    if path.startswith("pkg:") or os.path.isdir(path):
        folder = Path(modeling.weights_folder(recipe))
    else:
        import huggingface_hub
        cached = huggingface_hub.try_to_load_from_cache(path, "tokenizer_config.json")
        folder = Path(cached).parent if isinstance(cached, str) else None
    if folder is None or not recipe.model.gguf_file:
        return folder
    source = folder / recipe.model.gguf_file
    if not source.is_file():
        return None
    converted = modeling.gguf_cache_folder(source)
    return converted if (converted / "tokenizer_config.json").is_file() else source


def _json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _token_text(value: Any) -> Any:
    return value.get("content") if isinstance(value, dict) else value


def _gguf_template(path: Path) -> ChatTemplate | None:
    """tokenizer.chat_template of a GGUF file, read from its header (the token list is skipped, not built)."""
    fixed = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes

    def skip(handle, kind: int) -> bytes | None:
        if kind in fixed:
            handle.seek(fixed[kind], 1)
            return None
        if kind == 8:
            return handle.read(struct.unpack("<Q", handle.read(8))[0])
        item, count = struct.unpack("<IQ", handle.read(12))
        for _ in range(count):
            skip(handle, item)
        return None

    try:
        with path.open("rb") as handle:
            if handle.read(4) != b"GGUF":
                return None
            _, _, pairs = struct.unpack("<IQQ", handle.read(20))
            for _ in range(pairs):
                key = handle.read(struct.unpack("<Q", handle.read(8))[0])
                value = skip(handle, struct.unpack("<I", handle.read(4))[0])
                if key == b"tokenizer.chat_template" and value is not None:
                    return ChatTemplate(value.decode("utf-8", errors="replace"))
    except (OSError, struct.error):
        return None  # a damaged file is the model check's to name
    return None
