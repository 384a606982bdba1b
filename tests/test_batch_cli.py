"""End to end: `python -m launch.batch` in a subprocess on a tiny checkpoint folder with the GPT-2 tokenizer.

Every run shares one small engine shape and the compile cache every entry point uses (`batch_model`,
`batch_env` in conftest), so only the first run of a session compiles, and none once the cache is warm.
"""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINE_FLAGS = ["--max-slots", "2", "--max-seq-len", "128", "--decode-steps", "2", "--prefill-buckets", "16,64"]


def command(*args) -> list[str]:
    return [sys.executable, "-m", "launch.batch", *map(str, args)]


def run_batch(env: dict, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def write_jsonl(path: Path, lines: list) -> Path:
    """Dicts become JSON lines; strings are written as they are (bad lines, blank lines)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def greedy(ident, prompt: str, tokens: int = 6, **extra) -> dict:
    return {"id": ident, "prompt": prompt, "temperature": 0, "max_new_tokens": tokens, **extra}


# One line per error kind; the expected fragment names the problem (or the field).
BAD_LINES = [
    ('{"id": "broken", "prompt": "Hel', "invalid JSON"),
    ("[1, 2, 3]", "expected a JSON object"),
    ({"id": "no-prompt", "max_new_tokens": 3}, "prompt: missing"),
    ({"id": "bad-top-p", "prompt": "Hi", "top_p": 1.5}, "top_p"),
    ({"id": "bad-max-tokens", "prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"id": "bad-stop", "prompt": "Hi", "stop": 5}, "stop"),
    ({"id": "typo", "prompt": "Hi", "temprature": 0}, "temprature"),
    ({"id": "out-of-range", "prompt_token_ids": [464, 99999]}, "token id 99999 is out of range"),
    ({"id": "too-long", "prompt_token_ids": [464] * 200}, "200 tokens"),
    ({"id": "empty", "prompt_token_ids": []}, "empty"),
    ({"id": "greedy-a", "prompt": "repeated id"}, "repeats an earlier line"),
    ({"id": "bad-min-tokens", "prompt": "Hi", "max_tokens": 3, "min_tokens": 4}, "min_tokens: expected an int in [0, 3]"),
]
GOOD_LINES = [
    greedy("greedy-a", "The capital of France is"),
    greedy("greedy-b", "Once upon a time", tokens=5, logprobs=2),
    {"prompt_token_ids": [464, 2068, 7586], "n": 2, "max_tokens": 4, "seed": 11},
    greedy(7, "Numbers: one, two,", tokens=8, stop=["three"]),
]
OPENAI_LINES = [
    {"custom_id": "oa-1", "method": "POST", "url": "/v1/completions",
     "body": {"model": "gpt2", "prompt": "Say this is a test", "max_tokens": 5, "temperature": 0, "n": 2,
              "logprobs": 1}},
    {"custom_id": "oa-chat", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "gpt2", "messages": [{"role": "user", "content": "Hi"}]}},
    {"custom_id": "oa-many", "url": "/v1/completions", "body": {"prompt": ["a", "b"]}},
    {"custom_id": "oa-echo", "url": "/v1/completions", "body": {"prompt": "a", "echo": "yes"}},
    {"custom_id": "oa-temp", "url": "/v1/completions", "body": {"prompt": "a", "temperature": -1}},
    {"custom_id": "oa-score", "url": "/v1/completions",
     "body": {"prompt": "Say this is a test", "echo": True, "logprobs": 2, "max_tokens": 0}},
    # min_tokens = max_tokens: the stop string is never looked for, so all 6 tokens come back
    {"custom_id": "oa-min", "url": "/v1/completions",
     "body": {"prompt": "Say this is a test", "max_tokens": 6, "min_tokens": 6, "temperature": 0, "stop": " "}},
    {"custom_id": "oa-min-bad", "url": "/v1/completions", "body": {"prompt": "a", "min_tokens": -1}},
]
SCORE_LINE = {"id": "score", "prompt": "Say this is", "prompt_logprobs": 1, "echo": True, "max_tokens": 2,
              "temperature": 0}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, batch_model, batch_env):
    """One run over good, bad, blank and OpenAI lines, interleaved."""
    folder = tmp_path_factory.mktemp("mixed")
    lines = [GOOD_LINES[0], *[b for b, _ in BAD_LINES[:6]], "", GOOD_LINES[1], OPENAI_LINES[0], GOOD_LINES[2],
             *[b for b, _ in BAD_LINES[6:]], *OPENAI_LINES[1:], "   ", GOOD_LINES[3], SCORE_LINE]
    path = write_jsonl(folder / "mixed.jsonl", lines)
    proc = run_batch(batch_env, path, "--model", batch_model, *ENGINE_FLAGS, "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    outputs = read_jsonl(folder / "mixed.out.jsonl")
    return lines, outputs, proc


def expected_ident(line, line_no: int):
    if isinstance(line, dict):
        return line.get("custom_id", line.get("id", line_no))
    return None  # not JSON or not an object: no id; the output's "line" says which line it answers


def test_one_output_per_line_in_input_order(mixed):
    lines, outputs, _ = mixed
    numbered = [(no, x) for no, x in enumerate(lines) if not (isinstance(x, str) and not x.strip())]
    assert len(outputs) == len(numbered)  # blank lines get none
    for (no, line), out in zip(numbered, outputs):
        got = out.get("custom_id", out.get("id"))
        assert got == expected_ident(line, no)
        own_id = isinstance(line, dict) and ("id" in line or "custom_id" in line)
        assert out.get("line") == (None if own_id else no)  # a line without its own id: keyed by position


def test_bad_lines_get_error_naming_the_problem(mixed):
    _, outputs, proc = mixed
    errors = [o for o in outputs if "error" in o and "custom_id" not in o]
    assert len(errors) == len(BAD_LINES)
    for (_, fragment), out in zip(BAD_LINES, errors):
        assert fragment in out["error"], out
        assert set(out) == ({"id", "error"} if out["id"] is not None else {"id", "line", "error"})
    assert "lines: 8 ok, 17 failed" in proc.stderr  # 5 native + 3 OpenAI ok; 12 native + 5 OpenAI failed
    reused = re.search(r"prefix cache: (\d+)% of prompt tokens reused, (\d+) blocks cached", proc.stderr)
    # The summary carries the prefix-cache figures. Whether the n=2 line's samples fork here depends on
    # whether both find a free slot in one round (2 slots, requests queued ahead): forks are pinned by
    # tests/test_prefix_reuse.py; prompts are shorter than a block, so nothing is cached.
    assert reused and 0 <= int(reused[1]) <= 100 and reused[2] == "0"


def test_good_native_lines(mixed, batch_model):
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_path(batch_model)
    by_id = {o["id"]: o for o in mixed[1] if "id" in o and "error" not in o and "custom_id" not in o}
    a = by_id["greedy-a"]
    assert set(a) == {"id", "text", "token_ids", "finish_reason", "usage"}
    assert len(a["token_ids"]) == 6 and a["finish_reason"] == "length"  # the line's value beats the flag
    assert a["text"] == tok.decode(a["token_ids"])
    assert a["usage"] == {"prompt_tokens": len(tok.encode("The capital of France is")), "completion_tokens": 6}
    b = by_id["greedy-b"]
    assert len(b["logprobs"]) == 5 and all(len(lp["top"]) == 2 for lp in b["logprobs"])
    assert [lp["token_id"] for lp in b["logprobs"]] == b["token_ids"]
    assert all(lp["top"][0][1] >= lp["logprob"] - 1e-6 for lp in b["logprobs"])
    sampled = by_id[10]  # no id: its 0-based line number
    assert [c["index"] for c in sampled["choices"]] == [0, 1]
    assert all(len(c["token_ids"]) == 4 for c in sampled["choices"])  # max_tokens alias
    assert sampled["usage"] == {"prompt_tokens": 3, "completion_tokens": 8}
    stopped = by_id[7]
    assert "three" not in stopped["text"] and len(stopped["token_ids"]) <= 8
    score = by_id["score"]  # echo: the prompt's text first; prompt_logprobs: null, then one per later token
    prompt = tok.encode("Say this is")
    assert score["text"] == "Say this is" + tok.decode(score["token_ids"]) and len(score["token_ids"]) == 2
    assert score["prompt_logprobs"][0] is None and len(score["prompt_logprobs"]) == len(prompt)
    assert [lp["token_id"] for lp in score["prompt_logprobs"][1:]] == prompt[1:]
    assert all(len(lp["top"]) == 1 and lp["top"][0][1] >= lp["logprob"] for lp in score["prompt_logprobs"][1:])


def test_openai_batch_lines(mixed):
    outputs = {o["custom_id"]: o for o in mixed[1] if "custom_id" in o}
    assert set(outputs) == {line["custom_id"] for line in OPENAI_LINES}
    ok = outputs["oa-1"]
    assert ok["id"].startswith("batch_req_") and ok["error"] is None
    assert ok["response"]["status_code"] == 200 and ok["response"]["request_id"]
    body = ok["response"]["body"]
    assert body["object"] == "text_completion" and isinstance(body["created"], int) and body["id"]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["text"] == body["choices"][1]["text"]  # greedy: both samples agree
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 5
    assert "".join(logprobs["tokens"]) == body["choices"][0]["text"]
    usage = body["usage"]
    assert usage["completion_tokens"] == 10 and usage["total_tokens"] == usage["prompt_tokens"] + 10
    scored = outputs["oa-score"]["response"]["body"]["choices"][0]  # echo, max_tokens 0: the prompt alone
    assert scored["text"] == "Say this is a test" and "".join(scored["logprobs"]["tokens"]) == scored["text"]
    assert scored["logprobs"]["token_logprobs"][0] is None and scored["logprobs"]["top_logprobs"][0] is None
    assert all(len(top) <= 2 for top in scored["logprobs"]["top_logprobs"][1:])
    assert scored["logprobs"]["text_offset"][:2] == [0, len("Say")]
    held = outputs["oa-min"]["response"]["body"]["choices"][0]
    assert held["finish_reason"] == "length" and held["text"].startswith(body["choices"][0]["text"])
    assert " " in body["choices"][0]["text"]  # without min_tokens the stop string " " would have cut it
    for custom_id, fragment in [("oa-chat", "/v1/chat/completions"), ("oa-many", "2 prompts"),
                                ("oa-echo", "echo"), ("oa-temp", "temperature"), ("oa-min-bad", "min_tokens")]:
        out = outputs[custom_id]
        assert out["response"] is None and fragment in out["error"]["message"], out
        assert out["error"]["code"]


@pytest.fixture(scope="module")
def forty(tmp_path_factory, batch_model, batch_env):
    """A clean run to stdout over 40 lines (38 long greedy ones): the reference for the resume test."""
    folder = tmp_path_factory.mktemp("forty")
    long = [greedy(f"r{i}", f"Item {i}: the weather today is", tokens=32, ignore_eos=True) for i in range(38)]
    path = write_jsonl(folder / "jobs.jsonl", [GOOD_LINES[0], "not json", *long])
    proc = run_batch(batch_env, path, "--model", batch_model, *ENGINE_FLAGS, "--output", "-")
    assert proc.returncode == 0, proc.stderr
    assert not (folder / "jobs.out.jsonl").exists()
    return path, proc


def test_stdout_mode_prints_only_json_lines(forty, mixed):
    _, proc = forty
    outputs = [json.loads(line) for line in proc.stdout.splitlines()]  # fails on anything but JSON lines
    assert [o["id"] for o in outputs] == ["greedy-a", None, *(f"r{i}" for i in range(38))]
    assert outputs[1]["line"] == 1  # the line that is not JSON
    assert "error" in outputs[1] and "lines: 39 ok, 1 failed" in proc.stderr
    earlier = next(o for o in mixed[1] if o.get("id") == "greedy-a" and "error" not in o)
    assert outputs[0] == earlier  # greedy: other batch mates, same result


def complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_resume_after_kill_9(tmp_path, batch_model, batch_env, forty):
    path = shutil.copy(forty[0], tmp_path / "jobs.jsonl")
    out = tmp_path / "jobs.out.jsonl"
    victim = subprocess.Popen(command(path, "--model", batch_model, *ENGINE_FLAGS), cwd=REPO, env=batch_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while complete_lines(out) < 4 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done_before = complete_lines(out)
    assert 4 <= done_before < 40
    with out.open("ab") as f:
        f.write(b'{"id": "r37", "text": "a torn li')  # a crash in the middle of a write
    resumed = run_batch(batch_env, path, "--model", batch_model, *ENGINE_FLAGS, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done_before} lines already answered" in resumed.stderr
    assert f"{40 - done_before} ok, 0 failed, {done_before} skipped" in resumed.stderr
    outputs = read_jsonl(out)
    reference = [json.loads(line) for line in forty[1].stdout.splitlines()]
    assert sorted(map(json.dumps, outputs)) == sorted(map(json.dumps, reference))  # each id once, same results
    assert outputs == reference  # and in input order


def test_ids_never_collide_and_resume_answers_each_line_once(tmp_path, batch_model, batch_env):
    lines = ['{"id": 0, "prompt": "Hel',  # line 0, not JSON: no id (keyed by its line number)
             greedy(0, "Zero", 2),  # explicit id 0: the number of line 0
             {"prompt": "No id", "max_tokens": 2},  # line 2, no id: id 2 by position
             greedy(2, "Two", 2),  # explicit id 2
             "not json either"]
    path, out = write_jsonl(tmp_path / "ids.jsonl", lines), tmp_path / "ids.out.jsonl"
    first = run_batch(batch_env, path, "--model", batch_model, *ENGINE_FLAGS)
    assert first.returncode == 0, first.stderr
    outputs = read_jsonl(out)
    assert [(o["id"], o.get("line"), "error" in o) for o in outputs] == \
        [(None, 0, True), (0, None, False), (2, 2, False), (2, None, False), (None, 4, True)]
    out.write_text("".join(json.dumps(o) + "\n" for o in outputs[:2]))  # as if the job stopped after two lines
    resumed = run_batch(batch_env, path, "--model", batch_model, *ENGINE_FLAGS, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "2 ok, 1 failed, 2 skipped" in resumed.stderr
    assert [(o["id"], o.get("line")) for o in read_jsonl(out)] == [(o["id"], o.get("line")) for o in outputs]


def test_without_max_seq_len_the_context_is_sized_to_the_job(tmp_path, mixed, batch_model, batch_env):
    """The tiny model has 1024 positions; these lines need at most 14 (prompt + max_new_tokens), so a
    128-position engine answers them (`launch.batch_context`; the mixed run's shape, so its stored programs
    load), with the mixed run's tokens."""
    path = write_jsonl(tmp_path / "short.jsonl", [GOOD_LINES[0], GOOD_LINES[3]])
    flags = [f for f in ENGINE_FLAGS if f not in ("--max-seq-len", "128")]
    proc = run_batch(batch_env, path, "--model", batch_model, *flags, "--kv-slot-groups", "2", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
    assert "context: 128 positions (longest line 14 positions" in proc.stderr and "max_seq_len=128" in proc.stderr
    earlier = {o["id"]: o for o in mixed[1] if "token_ids" in o}  # not the repeated id's error
    outputs = read_jsonl(tmp_path / "short.out.jsonl")
    assert [o["id"] for o in outputs] == ["greedy-a", 7]
    assert all(o["token_ids"] == earlier[o["id"]]["token_ids"] for o in outputs)


def test_unloadable_model_fails_with_one_message(tmp_path, batch_env):
    model = tmp_path / "not_a_model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    path = write_jsonl(tmp_path / "in.jsonl", [greedy("x", "Hi")])
    proc = run_batch(batch_env, path, "--model", model, "--output", "-")
    assert proc.returncode == 1
    assert "cannot load model" in proc.stderr and "llama" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_mesh_flag_reaches_the_engine(tmp_path, batch_model, batch_env):
    path = write_jsonl(tmp_path / "in.jsonl", [greedy("x", "Hi")])
    proc = run_batch(batch_env, path, "--model", batch_model, "--mesh", "data=1,model=8", "--max-slots", "2")
    assert proc.returncode == 1  # 8 does not divide the tiny model's 4 heads: refused before any weight is read
    assert "mesh model=8" in proc.stderr and "sizes that work: 1, 2, 4" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_input_and_existing_output_fail_cleanly(tmp_path, batch_env):
    proc = run_batch(batch_env, tmp_path / "nope.jsonl")
    assert proc.returncode == 1
    assert "cannot read input" in proc.stderr and "nope.jsonl" in proc.stderr and "Traceback" not in proc.stderr
    path = write_jsonl(tmp_path / "in.jsonl", [greedy("x", "Hi")])
    (tmp_path / "in.out.jsonl").write_text('{"id": "x", "error": "earlier"}\n')
    proc = run_batch(batch_env, path)
    assert proc.returncode == 1 and "--resume" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "in.out.jsonl").read_text() == '{"id": "x", "error": "earlier"}\n'


def test_bad_flag_is_a_usage_error(tmp_path, batch_env):
    path = write_jsonl(tmp_path / "in.jsonl", [greedy("x", "Hi")])
    proc = run_batch(batch_env, path, "--top-p", "2")
    assert proc.returncode == 2 and "top_p" in proc.stderr
    proc = run_batch(batch_env, path, "--max-buffered-bytes", "1T")
    assert proc.returncode == 2 and "--max-buffered-bytes" in proc.stderr and "64M or 1G" in proc.stderr


@pytest.mark.parametrize("cli, argv, web", [("launch.batch", ["in.jsonl", "--top-p", "2"], False),
                                            ("launch.batch", ["in.jsonl", "--kv-slot-groups", "3"], False),
                                            ("launch.serve", ["--model", "m", "--max-waiting", "-1"], True)])
def test_a_bad_flag_fails_before_jax_is_imported(cli, argv, web, batch_env):
    """Flag checks need no JAX (its import alone takes seconds): a typo is answered at once. The batch CLI
    never imports the web framework either (fastapi's import is ~0.4 s of every batch job's start)."""
    script = (f"import sys\nfrom {cli} import main\ntry:\n    main({argv!r})\n"
              "except SystemExit as e:\n    print(e.code, 'jax' in sys.modules, 'fastapi' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=batch_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.stdout.split() == ["2", "False", str(web)], proc.stderr


def test_the_cli_exits_with_its_code_after_the_exit_handlers_and_with_its_output_flushed(tmp_path, batch_env):
    """`exit_now` skips the interpreter's teardown, not the exit handlers or buffered output."""
    marker = tmp_path / "handler-ran"
    script = (f"import atexit, pathlib, sys\nfrom launch.batch import exit_now\n"
              f"atexit.register(pathlib.Path({str(marker)!r}).write_text, 'yes')\n"
              "sys.stdout.write('buffered, no newline')\nsys.stderr.write('err')\nexit_now(3)\nprint('never')")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=batch_env, capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "buffered, no newline", "err")
    assert marker.read_text() == "yes"


def test_dummy_gpt2_uses_the_packaged_tokenizer(tmp_path, batch_env):
    lines = [{"id": "ids", "prompt_token_ids": [464, 2068, 7586, 21831], "temperature": 0},
             {"id": "text", "prompt": "no tokenizer files anywhere"},
             {"id": "stop", "prompt_token_ids": [464], "stop": ["x"]}]
    path = write_jsonl(tmp_path / "ids.jsonl", lines)
    # --scan-layers: one layer's programs to compile, not 12 (the layer loop runs in every other test here)
    proc = run_batch(batch_env, path, "--load-format", "dummy", "--model", "gpt2", "--max-slots", "2", "--max-seq-len",
                     "32", "--decode-steps", "2", "--prefill-buckets", "16", "--max-new-tokens", "3", "--scan-layers")
    assert proc.returncode == 0, proc.stderr
    ok, text, stop = read_jsonl(tmp_path / "ids.out.jsonl")
    assert isinstance(ok["text"], str) and len(ok["token_ids"]) == 3
    assert all(0 <= t < 50257 for t in ok["token_ids"])
    assert "error" not in text and len(text["token_ids"]) == 3
    assert "error" not in stop and stop["finish_reason"] in ("stop", "length")
