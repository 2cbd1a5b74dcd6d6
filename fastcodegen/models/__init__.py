"""The CodeGen forward pass: the layer loop (`codegen.py`) and its operations per backend."""
