"""A step's inputs: the buffers the native table declares, a step's views of them, decode padding.

The expected contents are worked out by hand from the prompts: a first step
of prompts that fit the budget computes every prompt token, row after row.
"""

from __future__ import annotations

import numpy as np
import torch

from fastcodegen.config import EngineConfig
from fastcodegen.sampling_params import SamplingParams
from fastcodegen.scheduler import Scheduler
from fastcodegen.step import SHAPE_FIELDS, StepBuffers


def _scheduler(**kwargs) -> Scheduler:
    config = EngineConfig("test", torch.device("cpu"), torch.float32, max_model_len=64, **kwargs)
    return Scheduler(config, num_blocks=64, eos_token_ids=(0,))


def test_buffers_follow_the_native_table():
    sched = _scheduler(max_num_seqs=6, max_num_batched_tokens=40, block_size=8)
    shapes = {f.name: f.shape for f in sched.fields}
    assert shapes["input_ids"] == shapes["positions"] == shapes["slot_mapping"] == (40,)
    assert shapes["query_start_loc"] == (7,) and shapes["context_lens"] == (6,)
    assert shapes["block_tables"] == (6, 8)  # 64 tokens of context in blocks of 8
    assert shapes["logits_indices"] == shapes["temperature"] == (12,)  # a row per sequence, and as many for forks
    buffers = StepBuffers(sched.fields, torch.device("cpu"))
    assert {k: tuple(t.shape) for k, t in buffers.tensors.items()} == shapes
    assert all(buffers.arrays[k].ctypes.data == t.data_ptr() for k, t in buffers.tensors.items())


def test_a_step_is_views_of_what_the_scheduler_wrote(fresh_seed):
    sched = _scheduler(max_num_seqs=4, max_num_batched_tokens=64, block_size=8)
    rng = np.random.default_rng(fresh_seed)
    prompts = [rng.integers(1, 1000, n).tolist() for n in (5, 11, 3)]
    for p, t in zip(prompts, (0.0, 0.7, 1.3)):
        sched.add(p, SamplingParams(temperature=t, max_tokens=4, seed=7 if t == 0.7 else None), report_tokens=False)
    step = sched.schedule()
    lens = [len(p) for p in prompts]
    assert (step.num_rows, step.num_tokens, step.num_samples, step.num_host_sampled) == (3, sum(lens), 3, 1)
    assert (step.max_query_len, step.max_context_len, step.is_decode, step.num_copies) == (11, 11, False, 0)
    assert step.input_ids.tolist() == sum(prompts, [])
    assert step.positions.tolist() == sum((list(range(n)) for n in lens), [])
    assert step.query_start_loc.tolist() == [0, 5, 16, 19] and step.context_lens.tolist() == lens
    assert step.logits_indices.tolist() == [4, 15, 18]  # each prompt's last token
    assert step.temperature.tolist() == [0.0, np.float32(0.7), np.float32(1.3)]
    assert step.host_sampled_rows.tolist() == [1]  # the seeded request
    slots = step.slot_mapping.tolist()
    for b, (a, e) in enumerate(zip([0, 5, 16], [5, 16, 19])):
        blocks = step.block_tables[b].tolist()
        assert slots[a:e] == [blocks[p // 8] * 8 + p % 8 for p in range(e - a)]
    assert set(SHAPE_FIELDS) <= set(vars(step))


def test_pad_decode_turns_rows_into_padding_and_keeps_the_rest():
    sched = _scheduler(max_num_seqs=10, max_num_batched_tokens=32)
    buffers = StepBuffers(sched.fields, torch.device("cpu"))
    for t in buffers.tensors.values():
        t.fill_(-7)
    buffers.pad_decode(3, 8)
    t = buffers.tensors
    assert t["input_ids"][:3].eq(-7).all() and t["input_ids"][3:8].eq(0).all() and t["input_ids"][8:].eq(-7).all()
    assert t["positions"][3:8].eq(0).all() and t["slot_mapping"][3:8].eq(-1).all()
    assert t["context_lens"][3:8].eq(0).all() and t["context_lens"][8:].eq(-7).all()
    assert t["query_start_loc"].tolist() == [-7] * 4 + [4, 5, 6, 7, 8] + [-7] * 2  # row r's query is token r


def test_the_shape_names_are_the_native_ones():
    from fastcodegen import _C

    assert tuple(_C.StepInfo().as_dict()) == SHAPE_FIELDS
