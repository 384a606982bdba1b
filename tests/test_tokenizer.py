"""Tokenizer, incremental detokenisation and stop strings against the real GPT-2 tokenizer files (the copy
the `engine` package ships)."""

import ast
import hashlib
from pathlib import Path

import pytest
import tokenizers

import engine.tokenizer
from engine.tokenizer import IncrementalDetokenizer, TextStream, Tokenizer
from tests.checkpoints import TOKENIZER_DIR, require_tokenizer
UNICODE_TEXT = "héllo wörld 你好 🤖👍🏽 naïve café — ½ ünïcödé 日本語のテキスト"
TEXTS = [
    "Hi my name is",
    UNICODE_TEXT,
    "  leading spaces\n\ttabs and\r\nnewlines  ",
    "It's 3.14159 o'clock, isn't it? <|endoftext|> Next doc.",
    "def f(x):\n    return x ** 2  # comment",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_path(require_tokenizer())


def stream_all(tok: Tokenizer, text: str, stop: list[str]) -> tuple[TextStream, list[str], bool]:
    """Pushes the ids of `text` one by one, popping a delta after each; returns deltas and stop flag."""
    stream = TextStream(tok, stop)
    deltas, hit = [], False
    for token_id in tok.encode(text):
        hit = stream.push(token_id)
        deltas.append(stream.pop_delta())
        if hit:
            break
    deltas.append(stream.finish())
    return stream, deltas, hit


def test_known_ids_and_special_tokens(tok):
    assert tok.encode("Hi my name is") == [17250, 616, 1438, 318]
    assert tok.eos_token_id == 50256
    assert tok.vocab_size == 50257
    assert tok.encode("<|endoftext|>") == [50256]
    assert tok.decode([50256]) == ""
    assert tok.decode([50256], skip_special_tokens=False) == "<|endoftext|>"


def test_unicode_round_trip(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text.replace("<|endoftext|>", "")
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


OFFICIAL_SHA256 = {  # the files of the hub's `gpt2` (identical for every GPT-2 size)
    "vocab.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "merges.txt": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


def test_packaged_files_are_the_official_ones():
    for name, digest in OFFICIAL_SHA256.items():
        assert hashlib.sha256((TOKENIZER_DIR / name).read_bytes()).hexdigest() == digest
    assert Tokenizer.gpt2().encode(TEXTS[0]) == [17250, 616, 1438, 318]


def test_vocab_merges_match_transformers_gpt2_tokenizer(tok):
    transformers = pytest.importorskip("transformers")
    slow = transformers.GPT2Tokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"))
    assert tok.eos_token_id == 50256 and tok.vocab_size == len(slow)
    for text in TEXTS:
        assert tok.encode(text) == slow.encode(text)
        assert tok.decode(tok.encode(text)) == slow.decode(tok.encode(text), skip_special_tokens=True)


def test_from_file_and_from_object(tok, tmp_path):
    tok._tok.save(str(tmp_path / "tokenizer.json"))
    by_file = Tokenizer.from_path(tmp_path / "tokenizer.json")
    assert by_file.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert Tokenizer.from_object(hf).encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)
    with pytest.raises(TypeError, match="tokenizers.Tokenizer"):
        Tokenizer("not a tokenizer")


def test_missing_files_error(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        Tokenizer.from_path(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        assert name in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_path(tmp_path / "nowhere")


def test_incremental_detokenizer_unicode(tok):
    ids = tok.encode(UNICODE_TEXT)
    partial = [i for i in ids if "\ufffd" in tok.decode([i])]
    assert partial, "the text should contain tokens that hold only part of a character"
    detok = IncrementalDetokenizer(tok)
    deltas = [detok.push(i) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == tok.decode(ids) == UNICODE_TEXT


def test_incremental_detokenizer_invalid_bytes(tok):
    emoji_ids = tok.encode("🤖")
    ids = tok.encode("a") + emoji_ids[:1] + tok.encode(" b") + emoji_ids[:1]
    detok = IncrementalDetokenizer(tok)
    joined = "".join(detok.push(i) for i in ids) + detok.flush()
    assert joined == tok.decode(ids)
    assert joined.endswith("\ufffd")


def test_stop_string_across_tokens(tok):
    text = "The answer is forty-two. END OF ANSWER and more text"
    stop = "END OF ANSWER"
    ids = tok.encode(text)
    assert not any(stop in tok.decode([i]) for i in ids), "stop should span several tokens"
    stream, deltas, hit = stream_all(tok, text, [stop])
    assert hit and stream.stopped
    assert stream.text == "The answer is forty-two. "
    assert "".join(deltas) == stream.text
    assert not any("END" in d for d in deltas)
    assert stream.push(ids[-1]) is True
    assert stream.text == "The answer is forty-two. " and stream.pop_delta() == ""


def test_held_back_prefix_released_when_it_does_not_match(tok):
    stream = TextStream(tok, ["END OF ANSWER"])
    popped = []
    for token_id in tok.encode("wait END OF"):
        assert stream.push(token_id) is False
        popped.append(stream.pop_delta())
    assert "".join(popped) == "wait "
    for token_id in tok.encode(" STORY"):
        stream.push(token_id)
        popped.append(stream.pop_delta())
    popped.append(stream.finish())
    assert "".join(popped) == stream.text == "wait END OF STORY"


def test_no_stop_finish_releases_everything(tok):
    stream, deltas, hit = stream_all(tok, UNICODE_TEXT + " ab", ["abc"])
    assert not hit and not stream.stopped
    assert deltas[-1].endswith("ab")
    assert "".join(deltas) == stream.text == UNICODE_TEXT + " ab"
    assert all("\ufffd" not in d for d in deltas)


def test_earliest_of_two_stop_strings_wins(tok):
    text = "alpha beta gamma delta"
    for stop in (["gamma", "beta"], ["beta", "gamma"]):
        stream, deltas, hit = stream_all(tok, text, stop)
        assert hit
        assert stream.text == "alpha "
        assert "".join(deltas) == "alpha "


def test_two_stops_completed_by_one_token_pick_earliest_start(tok):
    ids = tok.encode("xx hello world")
    stream = TextStream(tok, ["world", "lo wor"])
    hits = [stream.push(i) for i in ids]
    assert hits[-1] and not any(hits[:-1])
    assert stream.text == "xx hel"
    assert stream.finish() == "xx hel"


def test_include_stop_keeps_the_earliest_stop_string(tok):
    stream = TextStream(tok, ["world", "lo wor", "lo"], include_stop=True)
    hits = [stream.push(i) for i in tok.encode("xx hello world and more")]
    assert hits.index(True) == len(tok.encode("xx hello")) - 1
    assert stream.text == "xx hello"  # "lo" and "lo wor" start at the same place: the shorter one ends it
    assert stream.pop_delta() == "xx hello" and stream.finish() == ""


def test_stop_validation(tok):
    with pytest.raises(TypeError, match="sequence of strings"):
        TextStream(tok, "stop")
    with pytest.raises(ValueError, match="non-empty"):
        TextStream(tok, ["ok", ""])


def test_module_does_not_import_jax():
    tree = ast.parse(Path(engine.tokenizer.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not {m for m in imported if m.split(".")[0] in ("jax", "flax")}
