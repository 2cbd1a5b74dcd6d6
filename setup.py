"""Build script: the Python packages and the native extension `fastcodegen._C`.

Metadata lives in pyproject.toml; this file only says what setuptools cannot
read from there: that the top-level `kernels/` folder installs as
`fastcodegen.kernels`, and how to compile `csrc/`.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "fastcodegen._C",
        sources=["csrc/bindings.cpp", "csrc/block_pool.cpp", "csrc/scheduler.cpp", "csrc/utf8.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(
    packages=["fastcodegen", "fastcodegen.models", "fastcodegen.kernels", "fastcodegen.server", "fastcodegen.eval"],
    package_dir={"fastcodegen.kernels": "kernels"},
    # codegen-tiny-py and its draft, the checkpoints shipped with the package, and CodeGen's tokenizer
    package_data={
        "fastcodegen": [
            "data/codegen-tiny-py/*", "data/codegen-tiny-py-draft/*", "data/codegen-tokenizer/*", "data/mtpb/*"
        ]
    },
    include_package_data=False,
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)
