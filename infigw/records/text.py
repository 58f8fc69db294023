"""From raw examples to token ids and character spans that two tokenizers can be compared on.

Input rows (JSONL lines or Parquet rows) are either plain text, ``{"text": ..., "response_start": ...,
"response_end": ...}`` (the span is optional), or chat, ``{"messages": [{"role": ..., "content": ...}, ...]}``
rendered with the tokenizer's chat template; the response of a chat row is the last message when its role is
``assistant``.
"""
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np


@dataclass(frozen=True)
class SourceText:
    """One example as the teacher reads it: the text, its response span (None: not marked) and whether the
    tokenizer adds its special tokens (yes for plain text; no for chat, whose template writes them)."""

    text: str
    response_start: Optional[int]
    response_end: Optional[int]
    add_special_tokens: bool


@functools.lru_cache(maxsize=1)
def _whitespace_codepoints() -> np.ndarray:
    return np.array([c for c in range(0x110000) if chr(c).isspace()], dtype=np.uint32)


def trim_leading_whitespace(offsets: np.ndarray, text: str) -> np.ndarray:
    """Move each span's start past leading whitespace, unless the span is whitespace only.

    Byte-level BPE and SentencePiece tokenizers attach the space before a word to the word's token, WordPiece
    drops it; after trimming, word tokens of both start at the word's first character.
    """
    offsets = np.array(offsets, dtype=np.int64).reshape(-1, 2)
    codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    n = len(codepoints)
    not_space = ~np.isin(codepoints, _whitespace_codepoints())
    # next_word[i] = the first non-whitespace character at or after i (n if none).
    candidates = np.where(np.append(not_space, True), np.arange(n + 1), n)
    next_word = np.minimum.accumulate(candidates[::-1])[::-1]
    start, end = offsets[:, 0], offsets[:, 1]
    usable = (start >= 0) & (start < end) & (end <= n)
    first = next_word[np.clip(start, 0, n)]
    offsets[:, 0] = np.where(usable & (first < end), first, start)
    return offsets


def token_offsets(tokenizer, text: str, *, add_special_tokens: bool = True,
                  max_length: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Token ids (T,) int64 and character spans (T, 2) int64 of ``text``, spans trimmed of leading whitespace.

    Use it on the student side too, so both sides' offsets follow the same rule. Needs a fast (Rust) tokenizer,
    the kind that reports offsets.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"token offsets need a fast tokenizer (PreTrainedTokenizerFast); "
                        f"got {type(tokenizer).__name__}")
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True,
                         truncation=max_length is not None, max_length=max_length)
    ids = np.asarray(encoding["input_ids"], dtype=np.int64).reshape(-1)
    return ids, trim_leading_whitespace(encoding["offset_mapping"], text)


def _span_value(row: dict, name: str, text: str, where: str) -> Optional[int]:
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= len(text):
        raise ValueError(f"{where}: {name} must be an int in [0, len(text)={len(text)}], got {value!r}")
    return value


def render(row, tokenizer, where: str = "row") -> SourceText:
    """A data row -> :class:`SourceText` (see the module docstring for the accepted rows)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where} must be an object with 'text' or 'messages', got {type(row).__name__}")
    if "messages" in row and row["messages"] is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{where} is a chat row but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        last = messages[-1]
        if last.get("role") != "assistant":
            return SourceText(text, None, None, add_special_tokens=False)
        content = last.get("content")
        if not isinstance(content, str) or not content:
            raise ValueError(f"{where}: the last assistant message has no text content")
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        start = text.find(content, len(prompt)) if text.startswith(prompt) else text.rfind(content)
        if start < 0:
            raise ValueError(f"{where}: the chat template does not write the last assistant message verbatim; "
                             f"give the row as 'text' with 'response_start' instead")
        return SourceText(text, start, start + len(content), add_special_tokens=False)
    if isinstance(row.get("text"), str):
        text = row["text"]
        start = _span_value(row, "response_start", text, where)
        end = _span_value(row, "response_end", text, where)
        if start is not None and end is not None and end < start:
            raise ValueError(f"{where}: response_end ({end}) must not precede response_start ({start})")
        return SourceText(text, start, end, add_special_tokens=True)
    raise ValueError(f"{where} must have a string 'text' or a list 'messages', got keys {sorted(row)}")


def iter_rows(path) -> Iterator[Tuple[int, dict]]:
    """(index, row) of a JSONL (one object per non-blank line) or Parquet file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        index = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                yield index, row
                index += 1
        return
    with open(path, encoding="utf-8") as f:
        index = 0
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number} is not valid JSON: {error}") from error
            yield index, row
            index += 1
