"""Scoring and real clients end to end: `python -m launch.serve` on a tiny random GPT-2, driven by vLLM-style
HTTP calls (echo, prompt_logprobs, /tokenize, /detokenize, /tokenizer_info, /version, errors) and by
lm-evaluation-harness' `local-completions` model (remote tokenizer), compared sample by sample with lm-eval's
own `hf` backend on the same checkpoint (log-likelihoods within 1e-4 per token, is_greedy flags and
generations identical). The tasks' data files are written by the test; nothing is downloaded."""
from __future__ import annotations

import json

import pytest

from engine.tokenizer import Tokenizer
from tests.checkpoints import make_tiny_checkpoint
from tests.test_serve import running_server

httpx = pytest.importorskip("httpx")

FLAGS = ["--max-slots", "4", "--max-seq-len", "64", "--decode-steps", "4", "--prefill-buckets", "16,64",
         "--prefill-token-budget", "64", "--warmup-scoring", "--log-level", "WARNING"]
MC = [{"question": "The sky is", "choices": [" blue", " green", " made of cheese"], "answer": 0},
      {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0},
      {"question": "Paris is the capital of", "choices": [" France", " Spain", " Italy", " the moon"], "answer": 0},
      # the tiny model's greedy continuation (seed 3; lm-eval puts " " before a choice): is_greedy True
      {"question": "Once upon a time", "choices": ["time anarchism", "dog"], "answer": 0}]
GEN = [{"prompt": "Once upon a time", "target": " there"}, {"prompt": "Hello, my name is", "target": " Bob"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=3)
    with running_server(folder, FLAGS, tmp_path_factory.mktemp("log") / "server.log") as (url, log):
        yield url, folder, log


def _tasks(folder) -> None:
    """Two lm-eval tasks over local JSON files: multiple choice (log-likelihoods) and generate_until."""
    for name, rows in (("mc", MC), ("gen", GEN)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = "dataset_path: json\ntest_split: test\n"
    (folder / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (folder / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {folder / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['.', '\\n']\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\n"
        "metric_list:\n  - metric: exact_match\n")


def _samples(model: str, model_args: dict, include: str) -> dict:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=include, include_defaults=False)  # indexing lm-eval's own tasks: ~20 s
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["tiny_mc", "tiny_gen"],
                                  task_manager=tasks, log_samples=True,
                                  batch_size=1, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                  fewshot_random_seed=0)
    return {task: sorted(out["samples"][task], key=lambda s: s["doc_id"]) for task in ("tiny_mc", "tiny_gen")}


def test_lm_eval_local_completions_matches_hf(server, tmp_path, monkeypatch):
    url, folder, _ = server
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _tasks(tmp_path)
    ours = _samples("local-completions", {"base_url": f"{url}/v1/completions", "model": str(folder),
                                          "tokenizer_backend": "remote", "tokenized_requests": True,
                                          "max_length": 64, "num_concurrent": 1, "max_retries": 1}, str(tmp_path))
    theirs = _samples("hf", {"pretrained": str(folder), "device": "cpu", "dtype": "float32"}, str(tmp_path))
    tok = Tokenizer.gpt2()
    greedy = []
    for doc, a, b in zip(MC, ours["tiny_mc"], theirs["tiny_mc"]):
        assert len(a["resps"]) == len(b["resps"]) == len(doc["choices"])
        for choice, [(ll_a, greedy_a)], [(ll_b, greedy_b)] in zip(doc["choices"], a["resps"], b["resps"]):
            assert abs(ll_a - ll_b) <= 1e-4 * len(tok.encode(choice)) and greedy_a == greedy_b, (ll_a, ll_b)
            greedy.append(greedy_a)
    assert True in greedy and False in greedy  # both flags occur, so the comparison can fail either way
    gen_ours, gen_theirs = [s["resps"] for s in ours["tiny_gen"]], [s["resps"] for s in theirs["tiny_gen"]]
    assert gen_ours == gen_theirs and len(gen_ours) == len(GEN) and all(r[0][0] for r in gen_ours)


def test_tokenizer_endpoints_version_and_model_card(server):
    url, _, _ = server
    tok = Tokenizer.gpt2()
    r = httpx.post(f"{url}/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r == {"count": 2, "max_model_len": 64, "tokens": tok.encode("Hello world"),
                 "token_strs": ["Hello", "Ġworld"]}
    assert httpx.post(f"{url}/detokenize", json={"tokens": r["tokens"] + [50256]}).json() == \
        {"prompt": "Hello world<|endoftext|>"}
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 64
    assert isinstance(httpx.get(f"{url}/version").json()["version"], str)
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"] == 64
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [1, 99999]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize("method, path, status", [("GET", "/nope", 404), ("GET", "/v1/completions", 405),
                                                  ("PUT", "/tokenize", 405)])
def test_every_http_error_has_openai_shape(server, method, path, status):
    r = httpx.request(method, f"{server[0]}{path}")
    err = r.json()["error"]
    assert r.status_code == status and set(err) == {"message", "type", "param", "code"} and path in err["message"]


def _complete(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"temperature": 0, **body}, timeout=60)


def test_echo_logprobs_and_max_tokens_zero(server):
    url, _, _ = server
    tok = Tokenizer.gpt2()
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    full = _complete(url, prompt=prompt, echo=True, logprobs=2, max_tokens=3).json()["choices"][0]
    plain = _complete(url, prompt=prompt, logprobs=2, max_tokens=3).json()["choices"][0]
    assert full["text"] == prompt + plain["text"]
    lp = full["logprobs"]
    assert len(lp["tokens"]) == len(ids) + 3 and "".join(lp["tokens"]) == full["text"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][len(ids):] == plain["logprobs"]["token_logprobs"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert all(len(top) <= 2 and max(top.values()) >= v - 1e-6
               for top, v in zip(lp["top_logprobs"][1:], lp["token_logprobs"][1:]))
    only = _complete(url, prompt=[ids], echo=True, logprobs=1, max_tokens=0).json()
    assert only["choices"][0]["text"] == prompt and only["usage"]["completion_tokens"] == 0
    assert only["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][: len(ids)]
    assert "prompt_logprobs" not in only["choices"][0]  # computed for echo, shown only when asked for
    assert _complete(url, prompt=prompt, echo=True, max_tokens=0).json()["choices"][0]["logprobs"] is None


def _stream(url: str, **body) -> list[dict]:
    with httpx.stream("POST", f"{url}/v1/completions", json={"temperature": 0, "stream": True, **body},
                      timeout=60) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[6:])["choices"][0] for line in r.iter_lines() if line.startswith("data: {")]


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_streams_like_the_full_response(server, max_tokens):
    url, _, _ = server
    body = dict(prompt="The quick brown fox", echo=True, logprobs=2, max_tokens=max_tokens)
    full = _complete(url, **body).json()["choices"][0]
    chunks = _stream(url, **body)
    assert chunks[0]["text"].startswith(body["prompt"]) and chunks[0]["logprobs"]["token_logprobs"][0] is None
    assert "".join(c["text"] for c in chunks) == full["text"] and chunks[-1]["finish_reason"] == full["finish_reason"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [x for c in chunks if c["logprobs"] for x in c["logprobs"][key]] == full["logprobs"][key], key
    plain = _stream(url, **{**body, "logprobs": None})
    assert "".join(c["text"] for c in plain) == full["text"] and all(c["logprobs"] is None for c in plain)


def test_vllm_fields_prompt_logprobs_and_unknown_fields(server):
    url, _, log = server
    tok = Tokenizer.gpt2()
    ids = tok.encode("Hello there my friend")
    r = _complete(url, prompt=ids, max_tokens=2, prompt_logprobs=1, min_tokens=1, skip_special_tokens=True,
                  include_stop_str_in_output=False, frobnicate=3).json()["choices"][0]
    assert r["prompt_logprobs"][0] is None and len(r["prompt_logprobs"]) == len(ids)
    for token, entry in zip(ids[1:], r["prompt_logprobs"][1:]):
        assert str(token) in entry and 1 <= len(entry) <= 2
        assert min(e["rank"] or 1 for e in entry.values()) == 1
    log.flush()
    assert "ignoring unknown completion field 'frobnicate'" in open(log.name).read()
    full = _complete(url, prompt=ids, max_tokens=8, temperature=0).json()["choices"][0]["text"]
    stop = full[2:4]
    cut = _complete(url, prompt=ids, max_tokens=8, temperature=0, stop=[stop]).json()["choices"][0]["text"]
    kept = _complete(url, prompt=ids, max_tokens=8, temperature=0, stop=[stop],
                     include_stop_str_in_output=True).json()["choices"][0]["text"]
    assert kept == cut + stop == full[: full.index(stop) + len(stop)]
    for field, value in (("min_tokens", 17), ("include_stop_str_in_output", "yes"), ("prompt_logprobs", 50)):
        r = _complete(url, prompt="x", **{field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.json()


def test_continuous_usage_stats(server):
    url, _, _ = server
    body = {"prompt": "Hi", "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    tokens = [e["usage"]["completion_tokens"] for e in events if e["choices"]]
    assert tokens == sorted(tokens) and tokens[-1] == 5 and events[-1]["usage"]["completion_tokens"] == 5
