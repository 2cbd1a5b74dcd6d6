"""The CodeGen forward pass: the layer loop (`codegen.py`), its operations over a backend's kernels (`ops.py`)
and the plain PyTorch ones (`torch_ops.py`)."""
