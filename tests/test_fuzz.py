"""Property tests (Hypothesis) of everything that reads untrusted input: `SamplingParams`, the OpenAI request
parser (+ the server's request limits) and the batch line parser. Any JSON value gives either a valid
request, whose prompt the engine's `RequestFactory` turns into requests with finite per-slot rows, or a
ValueError / 400 naming a field; never another exception. Pure Python and NumPy: nothing compiles."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from engine.config import GPT2Config
from engine.requests import RequestFactory
from engine.sampling import SamplingParams
from engine.tokenizer import Tokenizer
from launch.jsonl import ALIASES, NATIVE_FIELDS, key_of_output, native_error, native_job, read_line
from launch.openai_api import OTHER_FIELDS, SAMPLING_FIELDS, ApiError, parse_completion_request
from launch.openai_batch import openai_job
from launch.server_limits import ServerLimits, check_request
from tests.checkpoints import require_tokenizer

FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams))
HUGE = st.sampled_from([10**400, -(10**400), 2**63, 2**64, 2**31, -1, 0, 1e39, -1e-45, 1e-300, float("inf"),
                        float("-inf"), float("nan"), True, False])
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | HUGE
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                         max_size=4), max_leaves=12)
PLAUSIBLE = {  # values near the valid range, so that valid parameter sets are generated too
    "max_new_tokens": st.integers(-2, 40), "temperature": st.floats(-1, 120), "top_k": st.integers(-1, 60),
    "top_p": st.floats(-0.5, 1.5), "min_p": st.floats(-0.5, 1.5), "repetition_penalty": st.floats(-1, 150),
    "presence_penalty": st.floats(-3, 3), "frequency_penalty": st.floats(-3, 3), "seed": st.integers(-5, 2**65),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=3),
    "stop_token_ids": st.lists(st.integers(-2, 60000), max_size=3), "ignore_eos": st.booleans(),
    "n": st.integers(-1, 3), "logprobs": st.integers(-1, 25) | st.none(),
}
TEXT_OR_IDS = st.text(max_size=30) | st.lists(st.integers(-5, 60000), max_size=6)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONTEXT = 64


@pytest.fixture(scope="module")
def factory() -> RequestFactory:
    return RequestFactory(GPT2Config(n_layer=1, n_head=1, n_embd=8), Tokenizer.from_path(require_tokenizer()),
                          CONTEXT, seed=0)


def value_for(field: str):
    return st.one_of(JSON, PLAUSIBLE.get(field, JSON))


@st.composite
def param_dicts(draw, names):
    chosen = draw(st.lists(st.sampled_from(names), unique=True, max_size=6))
    return {name: draw(value_for(name)) for name in chosen}


def assert_runnable(factory: RequestFactory, prompt, params: SamplingParams) -> None:
    """The prompt and parameters become requests with finite rows, or a ValueError naming a field."""
    try:
        requests = factory.make(prompt, params)
    except ValueError as e:
        assert re.match(r"^(prompt|prompt_token_ids|stop): ", str(e)), e
        return
    assert len(requests) == params.n
    for request in requests:
        assert all(np.all(np.isfinite(column)) for column in request.slot_row)
        assert request.key_data.dtype == np.uint32


@FUZZ
@given(fields=param_dicts(FIELDS))
def test_sampling_params_are_valid_or_name_the_field(fields):
    try:
        params = SamplingParams(**fields)
    except ValueError as e:
        field = str(e).split(":")[0].removeprefix("SamplingParams.")
        assert field in fields, e
        return
    for name, value in fields.items():
        if name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            assert not isinstance(value, bool) and np.isfinite(float(value)) and abs(value) <= 100
        if name in ("max_new_tokens", "top_k", "seed", "n") and value is not None:
            assert not isinstance(value, bool) and 0 <= value < 2**64
    assert params == SamplingParams(**fields)


OPENAI_KEYS = tuple(SAMPLING_FIELDS) + OTHER_FIELDS + ("frobnicate",)


@st.composite
def openai_bodies(draw):
    body = draw(param_dicts(OPENAI_KEYS))
    if draw(st.booleans()):
        body["prompt"] = draw(TEXT_OR_IDS | st.lists(TEXT_OR_IDS, max_size=3))
    for key in set(body) & set(SAMPLING_FIELDS):
        if draw(st.booleans()):
            body[key] = draw(PLAUSIBLE.get(SAMPLING_FIELDS[key], JSON))
    return body


@FUZZ
@given(body=openai_bodies() | JSON)
def test_openai_parser_gives_a_request_or_a_400_naming_the_field(factory, body):
    limits = ServerLimits(max_stop_strings=2, max_stop_chars=3, max_prompt_chars=20)
    try:
        req = parse_completion_request(json.loads(json.dumps(body)))  # what the server would have decoded
        check_request(req, limits, CONTEXT)
    except ApiError as e:
        assert e.status == 400 and e.type == "invalid_request_error"
        if isinstance(body, dict):
            assert e.param is not None and e.message.startswith(f"{e.param}: "), e.message
        return
    for prompt in req.prompts:
        assert_runnable(factory, prompt, req.params)


NATIVE_KEYS = tuple(NATIVE_FIELDS) + ("frobnicate",)


@st.composite
def native_lines(draw):
    obj = draw(param_dicts(NATIVE_KEYS))
    if draw(st.booleans()):
        obj[draw(st.sampled_from(["prompt", "prompt_token_ids"]))] = draw(TEXT_OR_IDS)
    return json.dumps(obj).encode()


@st.composite
def openai_lines(draw):
    body = draw(openai_bodies())
    line = {"custom_id": draw(JSON), "url": draw(st.sampled_from(["/v1/completions", "/v1/chat"])), "body": body}
    return json.dumps(line).encode()


RAW_LINES = native_lines() | openai_lines() | st.binary(max_size=40) | JSON.map(lambda v: json.dumps(v).encode()) | \
    st.sampled_from([b"[" * 100_000, b"1" * 5000, b'{"id": 1, "prompt": "\\ud800"}', b"\xff\xfe"])
KNOWN = set(NATIVE_FIELDS) | set(ALIASES) | {"custom_id", "method", "url", "body"}


@FUZZ
@given(raw=RAW_LINES, line_no=st.integers(0, 10**6))
@example(raw=b'{":": null}', line_no=3)  # a field name holding the ':' that ends it in the message
def test_batch_lines_give_a_job_or_an_error_naming_the_field(factory, raw, line_no):
    line = read_line(raw, line_no)  # never raises
    if line.problem is None:
        try:
            job = (openai_job if line.openai else native_job)(line, SamplingParams(), 7)
        except ValueError as e:
            message = str(e).removeprefix("body.")
            body = line.obj.get("body") if isinstance(line.obj.get("body"), dict) else {}
            # The message starts with the field's name (which may itself hold a ':', e.g. {":": null}).
            assert any(message.startswith(f"{name}:") for name in {*KNOWN, *line.obj, *body}), e
        else:
            assert_runnable(factory, job.prompt, job.params)
    if not line.openai:  # the resume key survives the output line's round trip
        assert key_of_output(json.loads(json.dumps(native_error(line, "x")))) == line.key
    if not line.explicit:
        assert line.key == f"line:{line_no}"


def test_a_null_token_id_is_an_error_naming_the_field(tiny_engine):
    with pytest.raises(ValueError, match="prompt_token_ids: token id None"):
        tiny_engine.requests.make([None], SamplingParams())
