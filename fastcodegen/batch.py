"""A step's batch as the tensors the model reads.

Rows are the running sequences in the scheduler's slot order; tokens of all
rows are packed along one axis (T tokens in all). Row b's new tokens are
`query_start_loc[b]:query_start_loc[b+1]` (possibly none, when a prompt waits
for budget) and sit at the end of its context, which after the step holds
`context_lens[b]` tokens. A decode step has exactly one new token per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, position of each token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, KV cache slot to write each token's K/V to; -1 writes nothing
    block_tables: torch.Tensor  # [R, max_blocks] int32
    context_lens: torch.Tensor  # [R] int32, tokens in the cache after this step
    query_start_loc: torch.Tensor  # [R + 1] int32, cumulative new-token counts
    logits_indices: torch.Tensor  # [S] int64, the tokens whose logits are sampled
    max_query_len: int
    max_context_len: int
    is_decode: bool  # one new token per row

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]
