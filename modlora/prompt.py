"""The Qwen2.5 chat format and the translation prompt, written in code (no Jinja).

One exchange renders as (the system message is Qwen2.5's default)::

    <|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n{completion}<|im_end|>\\n

Generation starts right after `<|im_start|>assistant\\n` and stops at `<|im_end|>`.
"""

from __future__ import annotations

from modlora.tokenizer import CHAT_SPECIAL_TOKENS, IM_END, IM_START, Tokenizer

SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# The user message of every translation example, in training and in evaluation. English-only
# wording for every direction (as in the paper's English-centric setup); "only the translation"
# keeps an untuned instruct model from adding commentary, which chrF++ would count as errors.
TRANSLATION_INSTRUCTION = (
    "Translate the following {src_name} text into {tgt_name}. Reply with the translation only.\n{text}"
)

_LANGUAGES: dict[str, str] = {
    "en": "English",
    "fr": "French",
    "de": "German",
    "ja": "Japanese",
    "zh": "Chinese",
}


def register_language(code: str, name: str) -> None:
    """Add a language code and the English name the prompt uses for it (e.g. "es", "Spanish").

    Re-registering a code with a different name is an error: it would silently change prompts of
    adapters already trained.
    """
    if _LANGUAGES.get(code, name) != name:
        raise ValueError(f"language {code!r} is already registered as {_LANGUAGES[code]!r}")
    _LANGUAGES[code] = name


def language_name(code: str) -> str:
    try:
        return _LANGUAGES[code]
    except KeyError:
        raise ValueError(
            f"unknown language code {code!r}; known: {', '.join(sorted(_LANGUAGES))} "
            "(add one with modlora.prompt.register_language(code, name))"
        ) from None


def _check_plain(name: str, text: str) -> None:
    # A chat special token inside user data would end the turn early (prompt injection).
    for token in CHAT_SPECIAL_TOKENS:
        if token in text:
            raise ValueError(f"{name} contains the special token {token!r}: {text[:80]!r}")


def chat_text(prompt: str, completion: str | None = None, system: str = SYSTEM_PROMPT) -> str:
    """The chat string of one exchange; without `completion` it ends at `<|im_start|>assistant\\n`."""
    _check_plain("prompt", prompt)
    text = f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n"
    if completion is None:
        return text
    _check_plain("completion", completion)
    return f"{text}{completion}{IM_END}\n"


def chat_prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Ids of the chat up to and including `<|im_start|>assistant\\n`."""
    return tokenizer.encode(chat_text(prompt))


def chat_example(tokenizer: Tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """Ids of a whole exchange and its loss mask (1 = a trained target token, 0 = not).

    Trained: the completion's tokens and the `<|im_end|>` that closes it (the model must learn
    to stop). Not trained: the system and user turns, `<|im_start|>assistant\\n`, and the final
    "\\n" after `<|im_end|>`, kept so the ids render the documented format exactly; generation
    stops at `<|im_end|>` and never predicts it.

    The ids are `chat_prompt_ids(...)` followed by the completion, so training sees exactly the
    prefix that generation continues from. With the byte-level BPE of Qwen2.5 this equals
    `tokenizer.encode(chat_text(prompt, completion))` unless the completion starts with a
    newline (the pre-tokenizer would merge it with the one before).
    """
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    _check_plain("completion", completion)
    target = tokenizer.encode(completion) + [tokenizer.im_end_id]
    tail = tokenizer.encode("\n")
    ids = prompt_ids + target + tail
    mask = [0] * len(prompt_ids) + [1] * len(target) + [0] * len(tail)
    return ids, mask


def translation_prompt(src: str, tgt: str, text: str) -> str:
    """The user message asking to translate `text` from language code `src` to `tgt`."""
    return TRANSLATION_INSTRUCTION.format(src_name=language_name(src), tgt_name=language_name(tgt), text=text)


def translation_prompt_ids(tokenizer: Tokenizer, src: str, tgt: str, text: str) -> list[int]:
    """Prompt ids for translating `text`; they end with `<|im_start|>assistant\\n`."""
    return chat_prompt_ids(tokenizer, translation_prompt(src, tgt, text))


def training_example(
    tokenizer: Tokenizer, src: str, tgt: str, text: str, translation: str
) -> tuple[list[int], list[int]]:
    """Ids and loss mask of one translation pair (see `chat_example` for what is trained)."""
    return chat_example(tokenizer, translation_prompt(src, tgt, text), translation)
