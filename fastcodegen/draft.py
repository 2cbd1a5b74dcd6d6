"""A draft model for speculative decoding: its proposals, and its own paged KV cache under the target's block tables.

The draft's cache holds every token the target's does, in the same slots
(same block size and number of blocks, so the scheduler's one block table
addresses both): its passes compute each token the target computes, and
block copies are made in both caches. No second allocator is needed, and the
prefix cache's blocks hold the draft's K/V of their tokens too.

Before the target's forward, a step whose sampled rows include proposals to
make (spec_token == DRAFT_PENDING; the scheduler leaves their input ids
pending) has the draft make them: for a sequence verifying m proposals, m
decode passes, pass i reading the sequence's token i of the step (its last
token, then the proposals so far) at its position and KV slot, and drawing
proposal i + 1 from the draft's distribution, filtered like the target's
(temperature, top-k, top-p; greedy rows take the argmax). The distributions
are kept for the target's rejection sampling (sampler.py).

After the target's forward, the draft runs the step's tokens those passes did
not: all of a row that made no proposals, only the last proposal of one that
did (the passes read its last token and every proposal but the last). In a
decode or verify step that is one token a row, a decode step. With CUDA
graphs, every decode-shaped pass replays a graph of its bucket of rows,
captured over the draft's own persistent buffers.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import _C
from .cuda_graphs import CudaGraphs
from .kv_cache import KVCache
from .models.codegen import CodeGenModel
from .sampler import Proposals, exponential_noise, filtered_probs, row_seed
from .step import SHAPE_FIELDS, StepBuffers, StepInputs

# Salts a seeded request's draft draws apart from its target draws at the same place.
DRAFT_SEED_SALT = 0x2545F4914F6CDD1D


class DraftModel:
    """The draft's weights and KV cache, and the passes that make a step's proposals."""

    def __init__(
        self,
        model: CodeGenModel,
        kv_cache: KVCache,
        vocab_limit: int,
        generator: torch.Generator,
        buffers: Optional[StepBuffers] = None,
    ):
        """`buffers`: persistent buffers of the step's device fields, which the decode passes' graphs read
        (`capture`); None runs every pass eagerly."""
        self.model = model
        self.kv_cache = kv_cache
        self.vocab_limit = vocab_limit
        self.generator = generator  # the engine's: unseeded rows' draws
        self._seeded = torch.Generator(device=generator.device)
        self._buffers = buffers
        self.graphs: Optional[CudaGraphs] = None
        # After propose(): the step's tokens the proposal passes did not run (host, device) and their count a row.
        self._follow: Optional[tuple[np.ndarray, torch.Tensor, np.ndarray]] = None

    def capture(self, buckets: list[int], pool: tuple, max_model_len: int) -> None:
        """Captures the decode passes of `buckets` rows as CUDA graphs over the persistent buffers."""
        self.graphs = CudaGraphs(buckets, "the draft's decode passes")
        self.graphs.capture(
            self.model, self.kv_cache, lambda b: self._buffers.padding_step(b, b, 1, max_model_len), pool
        )

    @torch.inference_mode()
    def propose(self, step: StepInputs, dev: StepInputs, requests: dict) -> Optional[Proposals]:
        """Fills the step's pending proposals into `dev.input_ids`; None when the step has none.

        `step` is the step in host memory (its arrays say which rows are
        pending), `dev` the same step on the device, after its upload.
        """
        host = step.arrays
        spec = host["spec_token"]
        pending = np.flatnonzero(spec == _C.DRAFT_PENDING)
        self._follow = None
        if not len(pending):
            return None
        # A speculating sequence's rows are consecutive: its pending proposals, then its own token's.
        starts = pending[np.r_[True, np.diff(pending) > 1]]
        runs = np.array([int(np.argmax(np.r_[spec[s:] != _C.DRAFT_PENDING, True])) for s in starts])
        first_token = host["logits_indices"][starts]  # the step's index of each sequence's last token
        batch_row = np.searchsorted(host["query_start_loc"], first_token, side="right") - 1
        # Every pass's indices are known now: they go to the device in one copy, since a copy from pageable host
        # memory waits for the device, and one per pass would stall each pass's launches behind the last pass.
        passes, arrays = [], []
        for i in range(runs.max()):
            active = np.flatnonzero(runs > i)
            at = first_token[active] + i  # the token this pass reads; its proposal goes at + 1
            row = starts[active] + i  # the sampled row that checks that proposal
            temperature = host["temperature"][row]
            sampled, greedy = np.flatnonzero(temperature > 0), np.flatnonzero(temperature == 0)
            passes.append((at, row, sampled, int(host["positions"][at].max()) + 1))
            arrays += [at, at + 1, batch_row[active], row, sampled, greedy]
        rows = np.concatenate([p[1] for p in passes])
        order = np.argsort(rows, kind="stable")
        keep, counts = self._follow_tokens(step, np.concatenate([p[0] for p in passes]))
        on_device = _upload([*arrays, order, keep], dev.input_ids.device)
        tokens, probs = [], []
        for i, (at, row, sampled, max_context) in enumerate(passes):
            at_d, next_d, batch_rows_d, row_d, sampled_d, greedy_d = on_device[6 * i : 6 * i + 6]
            logits = self._decode(dev, at_d, batch_rows_d, max_context)
            drawn, dist = self._draw(logits, dev, host, row, row_d, sampled, sampled_d, greedy_d, requests)
            dev.input_ids[next_d] = drawn
            tokens.append(drawn)
            probs.append(dist)
        self._follow = (keep, on_device[-1], counts)
        index = on_device[-2]
        return Proposals(rows[order], torch.cat(tokens)[index], torch.cat(probs)[index])

    @staticmethod
    def _follow_tokens(step: StepInputs, computed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The step's tokens the proposal passes do not run (they read `computed`), and how many of them each row
        has: a suffix of its tokens (a verifying sequence's last proposal; all of another's)."""
        keep = np.setdiff1d(np.arange(step.num_tokens), computed, assume_unique=True)
        return keep, np.diff(np.searchsorted(keep, step.arrays["query_start_loc"]))

    def _decode(
        self, dev: StepInputs, idx: torch.Tensor, rows: torch.Tensor, max_context: int, logits: bool = True
    ) -> Optional[torch.Tensor]:
        """One decode pass of the draft over the step's tokens `idx`, the last of their rows `rows` so far (both
        on the device): logits [n, vocab_limit] (None when not wanted, unless a graph made them anyway).

        A replayed graph's logits are its output: read them before the next replay.
        """
        n = len(idx)
        if self.graphs is not None and self.graphs.fits(n):
            t = self._buffers.tensors
            for name in ("input_ids", "positions", "slot_mapping", "block_tables"):
                torch.index_select(getattr(dev, name), 0, rows if name == "block_tables" else idx, out=t[name][:n])
            t["context_lens"][:n] = t["positions"][:n] + 1
            bucket = self.graphs.bucket(n)
            self._buffers.pad_decode(n, bucket)
            return self.graphs.replay(bucket)[:n, : self.vocab_limit]
        positions = dev.positions[idx]
        tensors = {
            "input_ids": dev.input_ids[idx],
            "positions": positions,
            "slot_mapping": dev.slot_mapping[idx],
            "query_start_loc": torch.arange(n + 1, dtype=torch.int32, device=idx.device),
            "context_lens": (positions + 1).to(torch.int32),
            "block_tables": dev.block_tables[rows],
        }
        shape = dict.fromkeys(SHAPE_FIELDS, 0) | {
            "num_rows": n, "num_tokens": n, "num_samples": n, "max_query_len": 1, "max_context_len": max_context,
            "is_decode": True,
        }  # fmt: skip
        hidden = self.model.forward(StepInputs(shape, tensors), self.kv_cache)
        return self.model.compute_logits(hidden)[:, : self.vocab_limit].float() if logits else None

    def _draw(
        self,
        logits: torch.Tensor,
        dev: StepInputs,
        host: dict,
        rows: np.ndarray,
        rows_d: torch.Tensor,
        sampled: np.ndarray,
        sampled_d: torch.Tensor,
        greedy_d: torch.Tensor,
        requests: dict,
    ):
        """Each row's proposal and the distribution it was drawn from, on the target row's sampling terms.

        `rows`: the sampled rows the proposals go to; `sampled`: which of them sample (temperature > 0), the
        others take the argmax (`greedy`). Each as host and device (`_d`) indices.
        """
        tokens = logits.argmax(dim=-1)
        dist = torch.zeros_like(logits, dtype=torch.float32)
        if len(sampled):
            r = rows_d[sampled_d]
            q = filtered_probs(logits[sampled_d].float(), dev.temperature[r], dev.top_k[r], dev.top_p[r])
            seeds = {}
            for j, row in enumerate(rows[sampled].tolist()):
                req = requests.get(int(host["sample_request"][row]))
                if req is not None and req.params.seed is not None:
                    seeds[j] = row_seed(host, row, req, DRAFT_SEED_SALT)  # the place of the token the row checks
            noise = exponential_noise(q, self.generator, self._seeded, seeds)
            tokens[sampled_d] = (q / noise).argmax(dim=-1)
            dist[sampled_d] = q
        dist[greedy_d, tokens[greedy_d]] = 1.0
        return tokens, dist

    @torch.inference_mode()
    def follow(self, step: StepInputs, dev: StepInputs) -> None:
        """Runs the step's tokens the proposal passes did not through the draft, so that its cache holds the K/V
        of every token the target computed (`step` in host memory, `dev` on the device)."""
        follow, self._follow = self._follow, None
        device = dev.input_ids.device
        if follow is not None:
            keep, keep_d, counts = follow
        elif step.is_decode:
            keep_d, counts = torch.arange(step.num_tokens, device=device), np.ones(step.num_rows, dtype=np.int64)
        else:
            self.model.forward(dev, self.kv_cache)
            return
        if not len(keep_d):
            return
        max_context = int(step.arrays["context_lens"].max(initial=0))
        if (counts == 1).all():
            self._decode(dev, keep_d, torch.arange(step.num_rows, device=device), max_context, logits=False)
            return
        # Rows with no token or several (a prompt's chunk beside verifying sequences): a ragged step. Each row
        # keeps a suffix of its tokens, so its context length is unchanged.
        tensors = dict(dev.tensors)
        for name in ("input_ids", "positions", "slot_mapping"):
            tensors[name] = getattr(dev, name)[keep_d]
        kept_starts = np.r_[0, np.cumsum(counts)]
        tensors["query_start_loc"] = torch.as_tensor(kept_starts, dtype=torch.int32, device=device)
        shape = dev.shape() | {"num_tokens": len(keep), "max_query_len": int(counts.max()), "is_decode": False}
        self.model.forward(StepInputs(shape, tensors), self.kv_cache)


def _upload(arrays: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Host index arrays as int64 tensors on `device`, in one copy."""
    packed = torch.as_tensor(np.concatenate(arrays).astype(np.int64, copy=False), device=device)
    return list(torch.split(packed, [len(a) for a in arrays]))
