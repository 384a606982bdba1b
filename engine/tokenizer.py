"""Text <-> token ids for GPT-2 (byte-level BPE via HF `tokenizers`) and streaming detokenisation.

Owns three things:
- `Tokenizer`: loads `tokenizer.json` or `vocab.json` + `merges.txt` (both give identical ids).
  `Tokenizer.gpt2()` loads the GPT-2 BPE files shipped in this package (`engine/gpt2_tokenizer/`, the same
  for every GPT-2 size): the tokenizer of a checkpoint folder or dummy preset that has none.
- `IncrementalDetokenizer`: turns one token id at a time into text deltas. Byte-level tokens may hold
  part of a UTF-8 character; a delta never ends inside a character, and the joined deltas plus
  `flush()` always equal `Tokenizer.decode` of all ids.
- `TextStream`: one request's output text with stop strings. Streamed deltas never contain any part of
  a stop string that later matches; the joined deltas equal the final `text`.

No JAX here: this module runs on the host only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

EOS_TOKEN = "<|endoftext|>"
PACKAGED_DIR = Path(__file__).resolve().parent / "gpt2_tokenizer"  # vocab.json + merges.txt
GPT2_VOCAB_SIZE = 50257
REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """A thin wrapper over a byte-level BPE `tokenizers.Tokenizer`."""

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer) -> None:
        if not isinstance(hf_tokenizer, tokenizers.Tokenizer):
            raise TypeError(
                f"expected a tokenizers.Tokenizer, got {type(hf_tokenizer).__name__}"
            )
        self._tok = hf_tokenizer
        self.eos_token_id: int | None = hf_tokenizer.token_to_id(EOS_TOKEN)
        self.vocab_size: int = hf_tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_object(cls, hf_tokenizer: tokenizers.Tokenizer) -> Tokenizer:
        """Wraps an already built `tokenizers.Tokenizer`."""
        return cls(hf_tokenizer)

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """Loads a `tokenizer.json` file, or a folder holding it or `vocab.json` + `merges.txt`."""
        path = Path(path)
        if path.is_file():
            return cls(tokenizers.Tokenizer.from_file(str(path)))
        if not path.is_dir():
            raise FileNotFoundError(
                f"tokenizer path {path} does not exist: pass a tokenizer.json file or a folder "
                "holding tokenizer.json or vocab.json + merges.txt"
            )
        if (path / "tokenizer.json").is_file():
            return cls(tokenizers.Tokenizer.from_file(str(path / "tokenizer.json")))
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return cls(_byte_level_bpe(path / "vocab.json", path / "merges.txt"))
        present = sorted(p.name for p in path.iterdir())
        raise FileNotFoundError(
            f"no tokenizer files in {path}: expected tokenizer.json, or vocab.json and merges.txt "
            f"together; found {present}"
        )

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """The GPT-2 tokenizer from the BPE files shipped in this package."""
        return cls.from_path(PACKAGED_DIR)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens added (`<|endoftext|>` in the text maps to its id)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """`encode` over many texts (parallel inside `tokenizers`)."""
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; invalid or partial UTF-8 bytes become U+FFFD."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (byte-level alphabet, e.g. 'Ġthe') of `token_id`, None if unknown."""
        return self._tok.id_to_token(int(token_id))


def _byte_level_bpe(vocab: Path, merges: Path) -> tokenizers.Tokenizer:
    """Builds the GPT-2 tokenizer from its original files, matching its `tokenizer.json`."""
    tok = tokenizers.Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if tok.token_to_id(EOS_TOKEN) is not None:
        tok.add_special_tokens([tokenizers.AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return tok


class IncrementalDetokenizer:
    """Streams text from token ids, decoding only a short window of recent tokens per step.

    `ids[prefix:read]` is the last emitted chunk (it starts and ends on character boundaries);
    `ids[read:]` are tokens not yet emitted, held while their text ends in an incomplete character.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        """Adds one token; returns the text it completes ('' while a character is still partial)."""
        self._ids.append(int(token_id))
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read])
        new_text = self._tokenizer.decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Releases any held tail as it decodes now (partial bytes become U+FFFD)."""
        prefix_text = self._tokenizer.decode(self._ids[self._prefix : self._read])
        new_text = self._tokenizer.decode(self._ids[self._prefix :])
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]


class TextStream:
    """One request's generated text: incremental detokenisation plus stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), include_stop: bool = False) -> None:
        """`include_stop`: the text ends after the stop string instead of before it (vLLM's
        include_stop_str_in_output)."""
        if isinstance(stop, str):
            raise TypeError(f"stop must be a sequence of strings, got the string {stop!r}")
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        self._detok = IncrementalDetokenizer(tokenizer)
        self._stop = tuple(stop)
        self._include_stop = include_stop
        self._text = ""
        self._sent = 0
        self._stopped = False
        self._finished = False

    @property
    def text(self) -> str:
        """The text so far; after a stop, the text before the stop string's first occurrence (or up to its
        end, with `include_stop`)."""
        return self._text

    @property
    def stopped(self) -> bool:
        """True once a stop string has appeared."""
        return self._stopped

    def push(self, token_id: int, check_stop: bool = True) -> bool:
        """Feeds one generated token; returns True when a stop string has now appeared. With `check_stop`
        False (a request short of its min_tokens) the text grows but no stop string is looked for; later
        pushes find only stop strings that end in their own new text (one straddling into it counts)."""
        if self._stopped or self._finished:
            return self._stopped
        self._append(self._detok.push(token_id), check_stop)
        return self._stopped

    def pop_delta(self) -> str:
        """Text safe to stream now and not returned before (holds back a possible stop prefix)."""
        end = len(self._text) if self._stopped else len(self._text) - self._stop_prefix_len()
        return self._take(max(end, self._sent))

    def finish(self) -> str:
        """Ends the request (length / eos): releases every held-back character."""
        if not self._stopped and not self._finished:
            self._append(self._detok.flush())
        self._finished = True
        return self._take(len(self._text))

    def _append(self, delta: str, check_stop: bool = True) -> None:
        """Adds `delta` and truncates at the earliest stop string that now occurs (after it with
        `include_stop`; of stop strings starting there, the shortest)."""
        if not delta:
            return
        if not check_stop:
            self._text += delta
            return
        old_len = len(self._text)
        self._text += delta
        hits = [(at, len(s)) for s in self._stop if (at := self._find_new(s, old_len)) >= 0]
        if hits:
            at, length = min(hits)
            self._text = self._text[: at + length if self._include_stop else at]
            self._stopped = True

    def _find_new(self, stop: str, old_len: int) -> int:
        """Index of `stop` in the text, searching only where a match would end in the new delta."""
        return self._text.find(stop, max(0, old_len - len(stop) + 1))

    def _stop_prefix_len(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self._text)), best, -1):
                if self._text.endswith(stop[:n]):
                    best = n
                    break
        return best

    def _take(self, end: int) -> str:
        """Returns `text[sent:end]` and marks it sent."""
        delta = self._text[self._sent : end]
        self._sent = max(self._sent, end)
        return delta
