"""A step's batch as the tensors the model reads.

Tokens of all sequences are packed along one axis (T tokens in all); sequence
b's new tokens are `query_start_loc[b]:query_start_loc[b+1]` and sit at the
end of its context, which after the step holds `context_lens[b]` tokens. A
prefill step has the whole (uncached part of the) prompt as new tokens, a
decode step one token per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, KV cache slot to write each token's K/V to; -1 writes nothing
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    context_lens: torch.Tensor  # [B] int32, tokens in the cache after this step
    query_start_loc: torch.Tensor  # [B + 1] int32, cumulative new-token counts
    logits_indices: torch.Tensor  # [B] int64, the token whose logits pick each sequence's next token
    max_query_len: int
    max_context_len: int

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]
