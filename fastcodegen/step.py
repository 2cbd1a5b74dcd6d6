"""One step's inputs, declared once.

The native scheduler declares every field of a step (name, dtype, shape in
terms of the engine's limits, which count of the step sizes it, whether the
device reads it) in one table, `FASTCODEGEN_STEP_FIELDS` in
csrc/scheduler.h, and hands it out as `_C.Scheduler.step_fields()`. From that
table alone this module allocates the pinned host buffers the scheduler
writes (bound to it by name), their numpy views, the device copies the model
reads, and a step's `StepInputs`: views of the part of each buffer a step
uses.

Rows are the running sequences in the scheduler's slot order; the tokens of
all rows are packed along one axis. Row b's new tokens are
`query_start_loc[b]:query_start_loc[b+1]` (none when a prompt waits for
budget) and sit at the end of its context, which after the step holds
`context_lens[b]` tokens. In a decode step every row has exactly one new
token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

_DTYPES = {"int64": torch.int64, "int32": torch.int32, "float32": torch.float32}
SHAPE_FIELDS = (
    "num_rows", "num_tokens", "num_samples", "num_host_sampled", "num_prompt_logits", "num_copies",
    "max_query_len", "max_context_len", "is_decode",
)  # fmt: skip


@dataclass(frozen=True)
class StepField:
    """One row of the native table."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # capacity: the engine's limits
    count: str  # the StepInputs count that sizes a step's view of it (its first dimension)
    extra: int  # added to that count (query_start_loc has num_rows + 1 entries)
    on_device: bool  # read by the model or the sampler on the device

    @classmethod
    def from_native(cls, row: tuple) -> "StepField":
        name, dtype, shape, count, extra, on_device = row
        return cls(name, _DTYPES[dtype], tuple(shape), count, extra, on_device)


class StepInputs:
    """The inputs of one step: its shape and a tensor per field of the native table, sized to the step.

    Shape (ints and a bool): num_rows, num_tokens, num_samples (logits rows
    sampled), num_host_sampled (of those, rows sampled with a request's own
    generator, logprobs, penalties or logit bias), num_prompt_logits (logits rows
    at prompt positions, scored for prompt_logprobs), num_copies (KV blocks copied before the
    forward), max_query_len, max_context_len, is_decode (every row has exactly
    one new token). Each field is an attribute of its name (csrc/scheduler.h
    says what it holds).
    """

    def __init__(self, shape: dict, tensors: dict[str, torch.Tensor], arrays: Optional[dict[str, np.ndarray]] = None):
        self.__dict__.update(shape)
        self.__dict__.update(tensors)
        self.tensors = tensors
        self.arrays = arrays  # numpy views of the same memory, for a step in host memory

    def shape(self) -> dict:
        """The step's shape values by name (SHAPE_FIELDS)."""
        return {k: getattr(self, k) for k in SHAPE_FIELDS}

    def replace(self, **changes) -> "StepInputs":
        """A copy with some shape values or tensors replaced."""
        shape = self.shape()
        tensors = dict(self.tensors)
        for k, v in changes.items():
            (shape if k in SHAPE_FIELDS else tensors)[k] = v
        return StepInputs(shape, tensors, self.arrays)


class StepBuffers:
    """Buffers for every field of `fields` on one device (host buffers pinned when `pin`)."""

    def __init__(self, fields: list[StepField], device: torch.device, pin: bool = False):
        self.fields = {f.name: f for f in fields}
        self.tensors = {
            f.name: torch.zeros(f.shape, dtype=f.dtype, device=device, pin_memory=pin and device.type == "cpu")
            for f in fields
        }
        self.arrays: Optional[dict[str, np.ndarray]] = (
            {k: t.numpy() for k, t in self.tensors.items()} if device.type == "cpu" else None
        )
        self._steps: dict[tuple, StepInputs] = {}

    def step(self, shape: dict) -> StepInputs:
        """A step of `shape` over these buffers: each field's part it uses (numpy views too, in host memory).

        Cached by the counts that size the views, since consecutive decode
        steps share them: a step is valid until the next one is asked for.
        """
        key = (
            shape["num_tokens"],
            shape["num_rows"],
            shape["num_samples"],
            shape["num_host_sampled"],
            shape["num_prompt_logits"],
            shape["num_copies"],
        )
        cached = self._steps.get(key)
        if cached is not None:
            cached.__dict__.update(shape)
        else:
            sizes = {f.name: shape[f.count] + f.extra for f in self.fields.values()}
            tensors = {k: t[: sizes[k]] for k, t in self.tensors.items()}
            arrays = None if self.arrays is None else {k: a[: sizes[k]] for k, a in self.arrays.items()}
            cached = StepInputs(shape, tensors, arrays)
            if len(self._steps) >= 64:
                self._steps.pop(next(iter(self._steps)))
            self._steps[key] = cached
        return cached

    def padding_step(self, rows: int, tokens: int, max_query_len: int, max_context_len: int) -> StepInputs:
        """A step of padding only over these buffers, `rows` rows and `tokens` tokens (to capture a graph).

        One token a row is a decode step (each row owns its token); more
        tokens are a ragged step whose rows own none. `max_context_len` is
        an upper bound (the engine's context limit): a replay serves steps
        of any context.
        """
        decode = tokens == rows and max_query_len == 1
        self.tensors["query_start_loc"][0] = 0
        if decode:
            self.pad_decode(0, rows)
        else:
            self.pad_ragged(0, 0, rows, tokens)
        shape = dict.fromkeys(SHAPE_FIELDS, 0) | {
            "num_rows": rows, "num_tokens": tokens, "max_query_len": max_query_len,
            "max_context_len": max_context_len, "is_decode": decode,
        }  # fmt: skip
        return self.step(shape)

    def pad_decode(self, rows: int, bucket: int) -> None:
        """Rows rows..bucket-1 of a decode step: padding that stores nothing (slot -1) and attends to nothing.

        Its one query sits at token index = row, its context is empty (the
        attention kernels write zeros for it), and its K/V slot is -1.
        """
        t = self.tensors
        t["input_ids"][rows:bucket] = 0
        t["positions"][rows:bucket] = 0
        t["slot_mapping"][rows:bucket] = -1
        t["context_lens"][rows:bucket] = 0
        starts = t["query_start_loc"]
        torch.arange(rows + 1, bucket + 1, out=starts[rows + 1 : bucket + 1])

    def pad_ragged(self, rows: int, tokens: int, bucket_rows: int, bucket_tokens: int) -> None:
        """Pads a step of `rows` rows and `tokens` tokens to `bucket_rows` and `bucket_tokens` (a verify step's graph).

        Padding tokens store nothing (slot -1) and belong to no row; padding
        rows have no tokens and an empty context, so attention skips them.
        """
        t = self.tensors
        t["input_ids"][tokens:bucket_tokens] = 0
        t["positions"][tokens:bucket_tokens] = 0
        t["slot_mapping"][tokens:bucket_tokens] = -1
        t["context_lens"][rows:bucket_rows] = 0
        t["query_start_loc"][rows + 1 : bucket_rows + 1] = tokens
