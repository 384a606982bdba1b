"""`echo` and prompt logprobs in OpenAI's and vLLM's completion shapes (server responses and batch lines).

With `echo`, a choice's text is the prompt's text followed by the generated text, and its `logprobs` cover
the prompt tokens then the generated ones, in OpenAI's legacy shape: `tokens`, `token_logprobs` (null for
the first prompt token: nothing conditions it), `top_logprobs` (null first, then {token text: logprob}),
`text_offset` counting from the start of the prompt text. A stream (as vLLM) echoes in each choice's first
chunk: the prompt's text and entries, then that chunk's generated ones. vLLM's `prompt_logprobs` field is a list with null
first, then per prompt token {"<token id>": {"logprob", "rank", "decoded_token"}} for the token and the
top-N (rank: 1-based place among the top-N, null when the token is not among them).
"""
from __future__ import annotations

from collections.abc import Sequence

from engine.requests import Completion, TokenLogprob
from engine.tokenizer import Tokenizer


def prompt_text(prompt_ids: Sequence[int], tokenizer: Tokenizer | None) -> str:
    return "" if tokenizer is None else tokenizer.decode(prompt_ids, skip_special_tokens=False)


def echo_logprobs(c: Completion, tokenizer: Tokenizer | None, payload) -> dict:
    """OpenAI logprobs of prompt + generated tokens; `payload` is `launch.openai_api.logprobs_payload`."""
    return echo_entries(c.prompt_token_ids, c.prompt_logprobs, c.logprobs or [], tokenizer, payload)


def echo_entries(prompt_ids: Sequence[int], prompt_logprobs: Sequence[TokenLogprob | None],
                 generated: Sequence[TokenLogprob], tokenizer: Tokenizer | None, payload) -> dict:
    """OpenAI logprobs of a prompt (its entries: None first, as `Completion.prompt_logprobs`) followed by
    `generated` (also a stream's first chunk: the tokens generated so far)."""
    rest = list(prompt_logprobs[1:])  # set whenever echo asks for logprobs (prompt_logprobs = logprobs)
    head = payload([TokenLogprob(prompt_ids[0], 0.0, ())], tokenizer)  # only its text is kept
    body = payload(rest + list(generated), tokenizer, len(head["tokens"][0]))
    return {"tokens": head["tokens"] + body["tokens"], "token_logprobs": [None] + body["token_logprobs"],
            "top_logprobs": [None] + body["top_logprobs"], "text_offset": head["text_offset"] + body["text_offset"]}


def vllm_prompt_logprobs(entries: Sequence[TokenLogprob | None], tokenizer: Tokenizer | None, token_text) -> list:
    """vLLM's `prompt_logprobs`: null, then {str(token id): {"logprob", "rank", "decoded_token"}} per token."""
    out: list[dict | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        ranks = {t: i + 1 for i, (t, _) in enumerate(e.top)}
        items = {e.token_id: e.logprob, **{t: v for t, v in e.top}}
        out.append({str(t): {"logprob": v, "rank": ranks.get(t), "decoded_token": token_text(t, tokenizer)}
                    for t, v in items.items()})
    return out
