"""Host arrays of an extend call: prompts resumed after their cached blocks (prefix caching).

Row i of the call is cache slot i (like decode), so attention reads each slot's cache blocks in place,
group by group, up to the blocks its row reaches: the model's windowed path with T tokens per row instead
of one. Each extending row holds its prompt's tokens [start, prompt_len) at positions start.., the first
`start` positions already in its slot (cached blocks); the other rows are padding. Padding tokens sit at
position max_len, so their K/V are dropped (past the cache) and no real token sees them.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from engine.prefix_plan import ExtendBatch
from engine.sampling import MinTokensBan, SamplingParams, SlotParams, slot_params


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExtendRows:
    tokens: np.ndarray  # i32[S,T]
    positions: np.ndarray  # i32[S,T] cache position of each token; max_len: padding
    last: np.ndarray  # i32[S] flat index (row * T + column) of each row's last token
    lengths: np.ndarray  # i32[S] prompt lengths (the slots' cache lengths after the call)
    slots: np.ndarray  # i32[S] i for an extending row, S otherwise (its state is left as it is)
    params: SlotParams  # each [S]
    keys: np.ndarray  # u32[S,2]
    wants_logprobs: np.ndarray  # bool[S]
    banned: np.ndarray  # u32[S,W] each row's min_tokens bit set (engine.sampling.MinTokensBan)

    @property
    def reach(self) -> list[int]:
        """Cache positions each row reads up to (0: none), for the per-group block counts."""
        return [int(n) if slot < len(self.slots) else 0 for slot, n in zip(self.slots, self.lengths)]


def pack_extend(batch: ExtendBatch, num_slots: int, max_len: int, ban: MinTokensBan) -> ExtendRows:
    s, t = num_slots, batch.bucket
    tokens = np.zeros((s, t), np.int32)
    positions = np.full((s, t), max_len, np.int32)
    last = np.arange(s, dtype=np.int32) * t
    lengths, slots = np.zeros(s, np.int32), np.full(s, s, np.int32)
    keys, wants = np.zeros((s, 2), np.uint32), np.zeros(s, bool)
    rows = [slot_params([SamplingParams(temperature=0.0)])] * s
    requests = {}  # slot -> SamplingParams of its extending request
    for (slot, req), start in zip(batch.rows, batch.starts):
        m = req.prompt_len - start
        tokens[slot, :m] = req.prompt_token_ids[start:]
        positions[slot, :m] = np.arange(start, req.prompt_len)
        last[slot] += m - 1
        lengths[slot], slots[slot], keys[slot] = req.prompt_len, slot, req.key_data
        wants[slot] = req.params.logprobs is not None
        rows[slot], requests[slot] = req.slot_row, req.params
    params = SlotParams(*(np.concatenate(column) for column in zip(*rows)))
    banned = ban.rows([requests.get(i) for i in range(s)])
    return ExtendRows(tokens, positions, last, lengths, slots, params, keys, wants, banned)


def dummy_extend_rows(num_slots: int, bucket: int, max_len: int, ban: MinTokensBan) -> ExtendRows:
    """Padding-only rows: compiles an extend program and changes nothing."""
    return pack_extend(ExtendBatch(bucket, (), ()), num_slots, max_len, ban)
