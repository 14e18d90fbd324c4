"""Build script for fpt_fast.

The Triton kernels live in the top-level ``kernels/`` folder and are installed as the subpackage
``fpt_fast.kernels``.
"""
from setuptools import setup

setup(
    name="fpt_fast",
    version="0.1.0",
    description="Kernel-accelerated Fine-grained Prompt Tuning (FPT, FPT+) for high-resolution "
    "medical image classification",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fpt_fast", "fpt_fast.kernels"],
    package_dir={"fpt_fast": "fpt_fast", "fpt_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4,<=2.14.1",
        "triton; platform_system == 'Linux'",
        "timm>=1.0.9",
        "numpy",
        "safetensors",
        "pyyaml",
        "pillow",
        "torchvision",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest>=7", "scikit-learn"],
        "tensorboard": ["tensorboard"],
        "xformers": ["xformers"],
    },
    entry_points={"console_scripts": ["fpt-fast=fpt_fast.__main__:main"]},
)
