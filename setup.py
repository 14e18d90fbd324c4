"""Build script for fpt_fast.

The Triton kernels live in the top-level ``kernels/`` folder and are installed as the subpackage
``fpt_fast.kernels``. The native extension's sources (``csrc/``) are installed as package data of
``fpt_fast.csrc`` so that an installed copy can build them just in time (fpt_fast/ops/native_backend.py).
``FPT_FAST_BUILD_EXT=1 pip install --no-build-isolation .`` builds them ahead of time instead, as
``fpt_fast.ops._C`` (torch must already be installed; the CUDA source is added where torch has CUDA and
CUDA_HOME is found, unless FPT_FAST_BUILD_CUDA=0). Both builds take their sources and flags from
fpt_fast/ops/native_build.py.
"""
import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def native_build_recipe():
    """fpt_fast/ops/native_build.py, the one list of the extension's sources and flags, loaded by
    path: importing the package would need torch and its dependencies at build time."""
    spec = importlib.util.spec_from_file_location(
        "fpt_fast_native_build", os.path.join(HERE, "fpt_fast", "ops", "native_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def native_extension():
    """ext_modules and cmdclass of the ahead-of-time build, or empty ones."""
    if os.environ.get("FPT_FAST_BUILD_EXT", "0") != "1":
        return {}
    import torch
    from torch.utils import cpp_extension

    recipe = native_build_recipe()
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("FPT_FAST_BUILD_CUDA", "1") != "0")
    # Relative: setuptools wants source paths relative to setup.py.
    sources = [os.path.join("csrc", name) for name in recipe.sources(with_cuda)]
    kwargs = dict(include_dirs=[os.path.join(HERE, "csrc")], define_macros=[("FPT_FAST_PYTHON_MODULE", None)],
                  extra_compile_args={"cxx": list(recipe.CXX_FLAGS), "nvcc": list(recipe.NVCC_FLAGS)},
                  extra_link_args=list(recipe.LINK_FLAGS))
    extension = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    return {"ext_modules": [extension("fpt_fast.ops._C", sources, **kwargs)],
            "cmdclass": {"build_ext": cpp_extension.BuildExtension}}


setup(
    name="fpt_fast",
    version="0.1.0",
    description="Kernel-accelerated Fine-grained Prompt Tuning (FPT, FPT+) for high-resolution "
    "medical image classification",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    # torch 2.14.1 and timm 1.0.31 (the tested versions) declare Requires-Python >=3.10.
    python_requires=">=3.10",
    packages=["fpt_fast", "fpt_fast.ops", "fpt_fast.model", "fpt_fast.app", "fpt_fast.kernels", "fpt_fast.csrc"],
    package_dir={"fpt_fast": "fpt_fast", "fpt_fast.kernels": "kernels", "fpt_fast.csrc": "csrc"},
    package_data={"fpt_fast.csrc": ["*.cpp", "*.h", "*.cu"]},
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "triton; platform_system == 'Linux'",
        "timm>=1.0.20",  # DINOv3 (Eva with rotate-half RoPE)
        "numpy",
        "safetensors",
        "pyyaml",
        "pillow>=10.1",  # ImageFont.load_default(size=...) for the explain figures
        "torchvision",
        "tqdm",
        "ninja",  # the native extension's just-in-time build (fpt_fast/ops/native_backend.py)
    ],
    extras_require={
        "test": ["pytest>=7", "scikit-learn", "matplotlib"],
        "tensorboard": ["tensorboard"],
        "bench": ["matplotlib"],  # benchmarks.report plots; `pip install peft` adds the LoRA rows
    },
    entry_points={"console_scripts": ["fpt-fast=fpt_fast.__main__:main"]},
    **native_extension(),
)
