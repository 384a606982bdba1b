"""vLLM-compatible extras of the server: tokenizer endpoints, `/version`, and OpenAI-shaped errors for
every HTTP error (404, 405, ...).

Endpoints (vLLM's shapes): `POST /tokenize` `{"prompt": str, "add_special_tokens"?, "return_token_strs"?}`
-> `{"count", "max_model_len", "tokens", "token_strs"}`; `POST /detokenize` `{"tokens": [int]}` ->
`{"prompt": str}`; `GET /tokenizer_info` -> the tokenizer's class and special tokens (lm-evaluation-harness'
remote tokenizer reads `eos_token` there); `GET /version` -> `{"version"}`.

vLLM's extra completion fields are mapped in `launch.vllm_fields` (no web framework there: the batch CLI
parses request bodies too, and importing fastapi is ~0.4 s of its start-up).
"""
from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from engine.tokenizer import EOS_TOKEN
from launch.openai_api import ApiError, bad


def _version() -> str:
    try:
        return metadata.version("gpt2-jax-engine")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def error_body(message: str, type_: str) -> dict:
    return {"error": {"message": message, "type": type_, "param": None, "code": None}}


def add_routes(app: FastAPI, server) -> None:
    """Register the tokenizer endpoints, /version and the OpenAI-shaped HTTP error handlers on `app`;
    `server` is `launch.serve.Server` (its tokenizer, engine and `error`)."""
    def tokenizer():
        if server.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer", None)
        return server.tokenizer

    async def guarded(handler, request):
        try:
            body = await request.json()
            if not isinstance(body, Mapping):
                raise bad(None, "the request body must be a JSON object")
            return JSONResponse(handler(body))
        except ApiError as e:
            return server.error(e)
        except ValueError as e:
            return server.error(bad(None, f"the request body is not valid JSON ({e})"))

    def tokenize(body: Mapping) -> dict:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad("prompt", f"expected a string, got {type(prompt).__name__}")
        tok = tokenizer()
        ids = tok.encode(prompt)
        strs = [tok.id_to_token(i) for i in ids] if body.get("return_token_strs") else None
        return {"count": len(ids), "max_model_len": server.engine.engine.max_seq_len, "tokens": ids,
                "token_strs": strs}

    def detokenize(body: Mapping) -> dict:
        ids = body.get("tokens")
        vocab = server.engine.engine.config.vocab_size
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                                for t in ids):
            raise bad("tokens", f"expected a list of token ids in [0, {vocab})")
        return {"prompt": tokenizer().decode(ids, skip_special_tokens=False)}

    @app.post("/tokenize")
    async def tokenize_route(request: Request):
        return await guarded(tokenize, request)

    @app.post("/detokenize")
    async def detokenize_route(request: Request):
        return await guarded(detokenize, request)

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        try:
            tokenizer()
        except ApiError as e:
            return server.error(e)
        return {"tokenizer_class": "GPT2TokenizerFast", "eos_token": EOS_TOKEN, "bos_token": EOS_TOKEN,
                "unk_token": EOS_TOKEN, "pad_token": None, "add_bos_token": False,
                "model_max_length": server.engine.engine.max_seq_len, "chat_template": None}

    @app.get("/version")
    async def version():
        return {"version": _version()}

    @app.exception_handler(HTTPException)
    async def http_error(_request, exc: HTTPException) -> JSONResponse:
        server.metrics.count(exc.status_code)
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(f"{exc.detail}: {_request.method} {_request.url.path}", type_),
                            status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, exc: RequestValidationError) -> JSONResponse:
        return server.error(bad(None, str(exc)))
