from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="prdp_ds",
    version="0.1.0",
    description="PRDP (Proximal Reward Difference Prediction) reward finetuning of Stable Diffusion "
    "with DeepSpeed ZeRO and Triton kernels",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["prdp_ds", "prdp_ds.*", "kernels", "kernels.*"]),
    package_data={"prdp_ds": ["presets/*.yaml", "world/weights/*", "world/weights_flow/*"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "deepspeed>=0.19.8",
        "diffusers>=0.30",
        "accelerate",
        # 5.25 requires the PyPI distribution `kernels`, whose import name this repo's kernels/ package
        # shadows (diffusers then imports ours in its place and fails): tests/test_kernels_package.py.
        "transformers>=4.44,<5.25",
        "triton>=3.0",
        "open_clip_torch>=2.24",
        "peft>=0.17",
        "pyarrow",
        "pyyaml",
        "safetensors",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "pillow",
        "numpy",
    ],
    extras_require={"test": ["pytest>=7.4"], "dev": ["ruff>=0.17"]},
)
