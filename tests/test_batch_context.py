"""A batch job's context sized to its lines (`launch.batch_context`): the level, what a line needs, and
when the default context stays. The end-to-end run is in test_batch_cli.py."""
from __future__ import annotations

import json
import os

import pytest

from engine.tokenizer import Tokenizer
from launch import batch_context
from launch.batch_context import (
    check_unchanged,
    context_level,
    longest_line,
    prompts,
    sized_options,
)
from launch.batch_io import input_lines


def write(path, lines) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


@pytest.mark.parametrize("need, cap, level", [(0, 1024, 128), (128, 1024, 128), (129, 1024, 256), (513, 1024, 1024),
                                              (5000, 1024, 1024), (300, 256, 256)])
def test_the_level_is_the_smallest_block_times_a_power_of_two_that_holds_the_line_up_to_the_cap(need, cap, level):
    assert context_level(need, 128, cap) == level


def test_a_line_needs_its_prompt_tokens_and_max_new_tokens_and_unreadable_lines_are_left_to_the_job(tmp_path):
    tokenizer = Tokenizer.gpt2()
    text = "The capital of France is"
    lines = [{"prompt_token_ids": [1] * 90, "max_tokens": 20},  # 110
             {"prompt": text, "max_new_tokens": 100},  # 5 tokens + 100
             {"prompt_token_ids": [1] * 100},  # + the default 16: 116
             {"prompt_token_ids": [1] * 119, "max_tokens": 0, "echo": True, "logprobs": 1},  # scoring: 119 + 1
             {"custom_id": "oa", "url": "/v1/completions", "body": {"prompt": [[1] * 50], "max_tokens": 60}},
             '{"prompt_token_ids": [1, 2', {"prompt": "x", "max_tokens": "5000"},  # not JSON; not an int
             {"prompt": "x", "max_tokens": 2**63}, {"prompt": "x", "max_new_tokens": -1},  # out of range
             {"prompt": ["x"] * 900}, {"custom_id": "chat", "body": {"messages": [{"content": "x" * 900}]}}]
    with open(write(tmp_path / "in.jsonl", lines), "rb") as f:
        read = list(prompts(input_lines(f), 16))
    assert [new for _, new in read] == [20, 100, 16, 1, 60]
    assert len(tokenizer.encode(text)) == 5
    assert longest_line(read, tokenizer, 1024) == 120
    assert longest_line(read[:3], tokenizer, 1024) == 116
    assert longest_line(read[1:2], None, 1024) == 0  # a text prompt without a tokenizer is the job's error
    assert longest_line(prompts([(0, b'{"prompt": "Hi"}')], 300), tokenizer, 1024) == 301  # --max-new-tokens


def test_a_line_the_job_refuses_for_another_field_only_makes_the_context_larger():
    line = b'{"prompt_token_ids": [1, 2], "max_tokens": 300, "top_p": 7}'
    assert longest_line(prompts([(0, line)], 16), None, 1024) == 302


def test_a_text_prompt_too_long_to_fit_at_any_rate_is_not_tokenized():
    class Refuses:
        def encode_batch(self, texts):
            raise AssertionError("tokenized a prompt of 64 characters a position")

    long = [("x" * (64 * 1024 + 1), 4)]
    assert longest_line(long, Refuses(), 1024) == 1024
    assert longest_line([("x" * (64 * 1024), 4)], Tokenizer.gpt2(), 1024) == 8192 + 4  # at the bound: tokenized


@pytest.mark.parametrize("block, cap, least", [(128, 1024, 513), (128, 256, 129), (128, 128, 1), (128, 64, 1),
                                               (128, 600, 513)])
def test_past_half_the_cap_every_line_gets_the_cap(block, cap, least):
    assert context_level(least, block, cap) == cap and (least == 1 or context_level(least - 1, block, cap) < cap)
    assert batch_context.needs_the_cap(block, cap) == least


def test_reading_stops_once_a_line_needs_the_cap():
    def lines():
        yield from prompts([(0, b'{"prompt_token_ids": [1, 2], "max_tokens": 2000}')], 16)
        raise AssertionError("read past a line that needs the whole context")

    assert longest_line(lines(), None, 1024) == 2002


def sized(path, *args) -> tuple[dict, int | None]:
    with open(path, "rb") as f:
        out = sized_options(f, *args)
        assert f.tell() == 0  # rewound for the job
    return out


def test_the_options_given_win_and_one_block_gets_one_slot_group(tmp_path):
    short = write(tmp_path / "short.jsonl", [{"prompt": "Hi", "max_tokens": 8}])
    long = write(tmp_path / "long.jsonl", [{"prompt_token_ids": [1] * 200, "max_tokens": 8}])
    tok, size = Tokenizer.gpt2(), os.path.getsize(short)
    assert sized(short, tok, 16, {"dtype": "float32"}) == ({"dtype": "float32", "max_seq_len": 128,
                                                           "kv_slot_groups": 1}, size)
    assert sized(short, tok, 16, {"kv_slot_groups": 4}) == ({"max_seq_len": 128, "kv_slot_groups": 4}, size)
    assert sized(long, tok, 16, {}) == ({"max_seq_len": 256}, os.path.getsize(long))
    assert sized(long, tok, 16, {"max_seq_len": 1024}) == ({"max_seq_len": 1024}, None)


def test_a_pipe_or_a_file_over_the_read_ahead_bound_keeps_the_default(tmp_path, monkeypatch):
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # keeps the read end's open from blocking, and the pipe unread
    try:
        os.write(writer, b'{"prompt": "Hi", "max_tokens": 8}\n')
        with open(fifo, "rb") as f:
            assert sized_options(f, None, 16, {"dtype": "float32"}) == ({"dtype": "float32"}, None)
            assert f.readline() == b'{"prompt": "Hi", "max_tokens": 8}\n'  # nothing consumed
    finally:
        os.close(writer)
    short = write(tmp_path / "short.jsonl", [{"prompt": "Hi", "max_tokens": 8}])
    monkeypatch.setattr(batch_context, "READ_AHEAD_BYTES", os.path.getsize(short) - 1)
    assert sized(short, None, 16, {}) == ({}, None)


def test_lines_appended_after_the_read_ahead_are_warned_about(tmp_path, caplog):
    path = write(tmp_path / "in.jsonl", [{"prompt_token_ids": [1], "max_tokens": 8}])
    with open(path, "rb") as f:
        options, read = sized_options(f, None, 16, {})
        check_unchanged(f, read, options["max_seq_len"])
        assert caplog.text == ""
        with open(path, "ab") as grow:
            grow.write(b'{"prompt_token_ids": [1], "max_tokens": 500}\n')
        check_unchanged(f, read, options["max_seq_len"])
    assert "the input grew from 43 to 88 bytes after it was read ahead" in caplog.text
    assert "context of 128 positions" in caplog.text
