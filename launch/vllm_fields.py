"""vLLM's extra completion fields (`split_extras`), for the server and the batch CLI alike: each vLLM field
this engine honours is mapped here (`min_tokens`, `prompt_logprobs`, `include_stop_str_in_output` become
SamplingParams fields, validated there), one that it knows but cannot honour (e.g. `skip_special_tokens`
false) is a 400 naming it, and a field nobody knows is dropped with a warning in the log, as vLLM does.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping

log = logging.getLogger("launch.serve")

# vLLM field -> the values this engine can honour (GPT-2 adds no special tokens; the output text never
# holds any).
HONOURED = {
    "add_special_tokens": (True, False), "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,),
    "truncate_prompt_tokens": (None,), "use_beam_search": (False,), "length_penalty": (1, 1.0), "detokenize": (True,),
}
# vLLM fields that are SamplingParams fields of the same meaning
PASSED_ON = ("prompt_logprobs", "include_stop_str_in_output", "min_tokens")


def split_extras(body: Mapping, known: set[str]) -> tuple[dict, dict]:
    """(body without vLLM extras and unknown fields, SamplingParams fields from the extras). ValueError
    'field: problem' for an extra this engine cannot honour; unknown fields are logged and dropped."""
    kept, params = {}, {}
    for key, value in body.items():
        if key in known:
            kept[key] = value
        elif key in PASSED_ON:
            if value is not None:
                params[key] = value
        elif key in HONOURED:
            if value is not None and value not in HONOURED[key]:
                raise ValueError(f"{key}: {value!r} is not supported by this engine; supported: {HONOURED[key]}")
        else:
            log.warning("ignoring unknown completion field %r", key)
    return kept, params
