"""A deterministic, cheap tokenizer and the Llama-3-style chat template of the emulator.

Text is cut into pieces of optional leading whitespace plus up to 4 non-space characters; each
piece's id is a CRC-32 of its bytes folded into a 128k vocabulary. So the same text always gives
the same ids (in every process: no Python hash randomisation), and two prompts that share a text
prefix share a token prefix (up to the piece where they part), which is what prefix caching needs.
Token counts land near real BPE counts for English (about 4 characters a token).

Generated text is filler made of short words; their ids are what this tokenizer gives them, so
text the emulator generated re-tokenizes to the same ids (multi-turn prompts hit the cache).
"""

from __future__ import annotations

import re
import zlib

VOCAB_SIZE = 128_000
_SPECIAL = 256  # ids below this are never produced by text pieces
_PIECE = re.compile(r"\s*\S{1,4}|\s+")

FILLER_WORDS = (
    "the and of to in a is that for it as with was on be by at this from or had not are but "
    "one all can her his more its will more when who out up so said what do if they no time "
    "into has more two may then like them well some only also over back use than most made "
    "make way even new want each see just how know take year good give day last work much"
).split()


def piece_id(piece: str) -> int:
    return _SPECIAL + zlib.crc32(piece.encode("utf-8")) % (VOCAB_SIZE - _SPECIAL)


FILLER_PIECES: tuple[str, ...] = tuple(" " + w for w in dict.fromkeys(FILLER_WORDS))
FILLER_IDS: tuple[int, ...] = tuple(piece_id(p) for p in FILLER_PIECES)
_FILLER_TEXT = dict(zip(FILLER_IDS, FILLER_PIECES, strict=True))


def pieces(text: str) -> list[str]:
    return _PIECE.findall(text)


def encode(text: str) -> list[int]:
    """Same text, same ids; a shared text prefix gives a shared token prefix."""
    return [piece_id(p) for p in _PIECE.findall(text)]


def decode(ids: list[int] | tuple[int, ...]) -> str:
    """Text of generated (filler) ids; other ids are not reversible and decode to nothing."""
    return "".join(_FILLER_TEXT.get(i, "") for i in ids)


def token_text(token_id: int) -> str:
    return _FILLER_TEXT.get(token_id, "")


def natural_length(ids: list[int], lo: int = 24, hi: int = 320) -> int:
    """Where a reply to this prompt 'naturally' ends (finish_reason stop) when max_tokens allows:
    deterministic per prompt, spread over [lo, hi)."""
    h = zlib.crc32(repr(ids[-64:]).encode()) if ids else 0
    return lo + h % (hi - lo)


# Llama 3 chat template (the shape vLLM applies for meta-llama/*-Instruct models)
BOS = "<|begin_of_text|>"


def _header(role: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n"


def message_text(content: object) -> str:
    """OpenAI message content: a string, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                raise ValueError("only text content parts are supported")
        return "".join(out)
    raise ValueError("message content must be a string or a list of text parts")


# What transformers' apply_chat_template raises for the pair (src/transformers/tokenization_utils_base.py,
# read in transformers 4.57.0, the release current with vLLM 0.11.0).
CONTINUE_WITH_GENERATION_PROMPT = (
    "continue_final_message and add_generation_prompt are not compatible. Use continue_final_message "
    "when you want the model to continue the final message, and add_generation_prompt when you want "
    "to add a header that will prompt it to start a new assistant message instead."
)


def apply_chat_template(
    messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False
) -> str:
    """The prompt text for a chat. With continue_final_message the last message, whoever's, is left
    open so the reply continues it (transformers checks no role); it needs add_generation_prompt
    false."""
    if continue_final_message and add_generation_prompt:
        raise ValueError(CONTINUE_WITH_GENERATION_PROMPT)
    parts = [BOS]
    for i, msg in enumerate(messages):
        last = i == len(messages) - 1
        text = message_text(msg.get("content"))
        parts.append(_header(str(msg.get("role", "user"))))
        parts.append(text)
        if not (last and continue_final_message):
            parts.append("<|eot_id|>")
    if add_generation_prompt:
        parts.append(_header("assistant"))
    return "".join(parts)
