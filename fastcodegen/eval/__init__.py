"""The paper's benchmarks, HumanEval and MTPB: generation, sandboxed execution and pass@k."""
