"""`python -m launch.serve --model M [--host 127.0.0.1] [--port 8000] [...]`: an OpenAI-compatible server.

Endpoints: `POST /v1/completions` (JSON or SSE stream), `GET /v1/models`, `GET /health`, `GET /metrics`
(Prometheus text), and vLLM's `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`, `GET /version`
(`launch/vllm_api.py`). Engine flags map 1:1 onto `EngineConfig` fields, limit flags onto `ServerLimits`
(`launch/server_limits.py`). The engine runs on one background thread (`engine.async_engine.AsyncEngine`);
FastAPI handlers only submit requests (prompts are tokenized on a worker thread) and relay deltas.

Invariants:
- Binds to 127.0.0.1 unless --host says otherwise.
- Every error is OpenAI's error object: 400 naming the field, 401 without the --api-key, 404 for an unknown
  model or path, 405 for a wrong method, 408 for a body too slow to arrive, 413 for one too large, 429 with
  `Retry-After` when more than --max-waiting requests would wait for a slot, 503 once the engine stopped.
- A request that fails while running gets 500 (an error event in a stream); the engine serves the others,
  and /health turns 503 only when the engine loop cannot run at all.
- A client that disconnects (streaming or not) has its requests aborted; their slots free at once.
- A stream is `data: {chunk}\\n\\n` events ending with `data: [DONE]\\n\\n`, also after an error event.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from engine.async_engine import AsyncEngine, EngineClosedError, QueueFullError, RequestError, RequestStream
from engine.config import DTYPES, EngineConfig
from engine.requests import Completion
from launch.engine_flags import EngineLoadError, add_engine_flags, engine_options, load_engine
from launch.openai_api import (ApiError, CompletionRequest, bad, bad_field, completion_body, new_completion_id,
                               parse_completion_request, stream_chunk, stream_choice, usage)
from launch.server_limits import ServerLimits, add_limit_flags, check_request, install_guards, limits_from_args, \
    uvicorn_options
from launch.server_metrics import CONTENT_TYPE, ServerMetrics
from launch.vllm_api import add_routes

log = logging.getLogger("launch.serve")
ENGINE_FLAGS = ("max_slots", "max_seq_len", "decode_steps", "prefill_buckets", "prefill_token_budget", "mesh",
                "seed", "enable_prefix_caching", "prefix_cache_max_blocks", "scan_layers",
                "kv_slot_groups")


@dataclasses.dataclass
class Server:
    """What the routes share."""

    engine: AsyncEngine
    model: str
    metrics: ServerMetrics
    started: int
    limits: ServerLimits = ServerLimits()

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    def error(self, e: ApiError, headers: dict | None = None) -> JSONResponse:
        self.metrics.count(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=headers)


def create_app(engine: AsyncEngine, model: str, device: str | None = None,
               limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app over a running AsyncEngine; the app's shutdown shuts the engine down. `device` (e.g.
    "cpu x8") is shown on the model card, so benchmarks can record what served them."""
    server = Server(engine, model, ServerMetrics(engine), int(time.time()), limits or ServerLimits())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        await engine.shutdown()

    app = FastAPI(title="gpt2-jax-engine", lifespan=lifespan)
    app.state.server = server
    install_guards(app, server.limits, server.metrics.count)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.error("request failed: %r", exc)
        return server.error(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", None, "server_error"))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _completions(server, request)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": server.model, "object": "model", "created": server.started, "owned_by": "gpt2-jax-engine",
                "max_model_len": engine.engine.max_seq_len, "device": device}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.running
        return JSONResponse({"status": "ok" if ok else "engine stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    add_routes(app, server)
    return app


async def _completions(server: Server, request: Request) -> Response:
    try:
        req = parse_completion_request(await _json_body(request))
        if req.model is not None and req.model != server.model:
            raise ApiError(404, f"model: {req.model!r} is not served here; this server serves {server.model!r}",
                           "model", code="model_not_found")
        check_request(req, server.limits, server.engine.engine.max_seq_len)
        handle = await server.engine.submit_async(req.prompts, req.params)
    except ApiError as e:
        return server.error(e)
    except ValueError as e:
        return server.error(bad_field(str(e)))
    except QueueFullError as e:
        retry = str(max(1, math.ceil(e.retry_after_s)))
        return server.error(ApiError(429, str(e), None, "rate_limit_error", "queue_full"), {"Retry-After": retry})
    except EngineClosedError as e:
        return server.error(ApiError(503, str(e), None, "server_error", "engine_stopped"))
    cid = new_completion_id()
    if req.stream:
        outcome = {"status": 499}  # set by the stream when it ends; still 499 if the client left first

        async def finish() -> None:  # runs after the response, also after a disconnect cancelled the stream
            handle.abort()
            server.metrics.count(outcome["status"])

        return StreamingResponse(_sse(server, cid, req, handle, outcome), media_type="text/event-stream",
                                 background=BackgroundTask(finish))
    try:
        done = await _collect_unless_disconnected(server, handle, request)
    except EngineClosedError as e:
        return server.error(ApiError(503, str(e), None, "server_error", "engine_stopped"))
    except RequestError as e:
        return server.error(_request_failed(e))
    if done is None:
        server.metrics.count(499)
        return Response(status_code=499)
    server.metrics.count(200)
    return JSONResponse(completion_body(cid, server.model, done, req.params.n, server.tokenizer, req.echo,
                                        req.prompt_logprobs))


async def _json_body(request: Request) -> object:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # also: not UTF-8, an int over 4300 digits, nesting too deep
        raise bad(None, f"the request body is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


def _request_failed(e: RequestError) -> ApiError:
    return ApiError(500, f"internal error: {e}", None, "server_error", "request_failed")


async def _collect_unless_disconnected(server: Server, handle: RequestStream,
                                       request: Request) -> dict[int, Completion] | None:
    """Every choice's Completion, or None when the client went away first (its requests are aborted)."""
    async def collect() -> dict[int, Completion]:
        done = {}
        async for delta in handle:
            if delta.completion is not None:
                done[delta.index] = delta.completion
                server.metrics.observe(delta.timing)
        return done

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():  # the client left (or this handler was cancelled): stop generating
            work.cancel()
            handle.abort()
    return work.result() if work.done() else None


async def _sse(server: Server, cid: str, req: CompletionRequest, handle: RequestStream,
               outcome: dict) -> AsyncIterator[str]:
    """The event stream; a disconnect cancels it (the response's background task aborts what is left)."""
    offsets, finished, echoed = {}, {}, set()
    prompt_tokens = sum(len(p) for p in handle.prompt_token_ids[:: req.params.n])
    generated = 0
    try:
        async for delta in handle:
            echo = req.echo and delta.index not in echoed
            echoed.add(delta.index)
            choice = stream_choice(delta, server.tokenizer, offsets,
                                   handle.prompt_token_ids[delta.index] if echo else None)
            generated += len(delta.token_ids)
            if delta.completion is not None:
                finished[delta.index] = delta.completion
                server.metrics.observe(delta.timing)
            if choice is not None:  # vLLM's continuous_usage_stats: the usage so far on every chunk
                tally = usage(prompt_tokens, generated) if req.continuous_usage else None
                yield _event(stream_chunk(cid, server.model, [choice], tally))
        if req.include_usage:
            done = [finished[i] for i in sorted(finished)]
            prompt_tokens = sum(len(c.prompt_token_ids) for c in done[:: req.params.n])
            tally = usage(prompt_tokens, sum(len(c.token_ids) for c in done))
            yield _event(stream_chunk(cid, server.model, [], tally))
        outcome["status"] = 200
    except EngineClosedError as e:
        outcome["status"] = 503
        yield _event(ApiError(503, str(e), None, "server_error", "engine_stopped").body())
    except RequestError as e:
        outcome["status"] = 500
        yield _event(_request_failed(e).body())
    finally:
        handle.abort()  # at once when cancelled mid-await
    yield "data: [DONE]\n\n"


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


# -- command line ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launch.serve", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="hub id or local folder of an HF GPT-2 checkpoint "
                                                  "(or a preset name with --load-format dummy)")
    p.add_argument("--served-model-name", help="the name clients pass as `model`; unset: the --model value")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes the server")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-waiting", type=int, default=256,
                   help="requests allowed to wait for a slot; beyond that the server answers 429")
    p.add_argument("--tokenizer", help="tokenizer folder/file or hub id (default: the model's own)")
    p.add_argument("--load-format", default="auto",
                   help="as Engine.from_pretrained: auto, safetensors, dummy (random weights of the model's shape)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="skip compiling every program before serving (the first requests compile instead)")
    p.add_argument("--wait-for-loads", action="store_true",
                   help="open the port only once every program is in memory; unset: programs the executable store "
                        "holds load in the background after the port opens (a request meanwhile loads or waits for "
                        "its own; /metrics engine_programs_ready counts them)")
    p.add_argument("--warmup-scoring", action="store_true",
                   help="also compile the scoring prefill programs before serving (echo / prompt_logprobs requests, "
                        "e.g. lm-eval log-likelihoods; they roughly double the prefill compile time); unset: each "
                        "compiles on its first scoring call")
    e = p.add_argument_group("engine (EngineConfig fields; default: EngineConfig's)")
    e.add_argument("--dtype", choices=DTYPES, default=EngineConfig.dtype)
    add_engine_flags(e, ENGINE_FLAGS)
    add_limit_flags(p)
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    options = engine_options(args, ENGINE_FLAGS, parser)
    if args.max_waiting < 0:
        parser.error(f"--max-waiting: expected an int >= 0, got {args.max_waiting}")
    limits = limits_from_args(args, parser, os.environ.get("ENGINE_API_KEY"))
    import uvicorn

    started = time.perf_counter()
    try:
        engine = load_engine(args, options)
    except EngineLoadError as e:  # the server ends before it binds: one message
        log.error("%s", e)
        return 1
    if args.warmup:
        engine.warmup(score=args.warmup_scoring, background=not args.wait_for_loads)
    import jax

    device = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
    log.info("engine ready in %.1f s; serving %s on http://%s:%d", time.perf_counter() - started,
             args.served_model_name or args.model, args.host, args.port)
    app = create_app(AsyncEngine(engine, max_waiting=args.max_waiting), args.served_model_name or args.model, device,
                     limits)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(), timeout_graceful_shutdown=5,
                **uvicorn_options(limits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
