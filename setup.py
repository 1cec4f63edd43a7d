from setuptools import find_packages, setup

setup(
    name="csd_kernels",
    version="0.1.0",
    description="Fused Triton kernels for Concrete Score Distillation (LLM knowledge distillation)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["csd_kernels", "csd_kernels.*"]),
    # the CPU backend's row passes, compiled on the first use by torch.utils.cpp_extension (with ninja)
    package_data={"csd_kernels.kernels": ["cpu_rows.cpp"]},
    python_requires=">=3.9",
    install_requires=[
        # Tested with torch 2.13 (CPU) and 2.11 (CUDA). A CUDA build of torch pins its own triton,
        # which this range admits; a CPU build has none, so triton (whose interpreter runs the
        # kernels on CPU) is required explicitly on Linux.
        "torch>=2.4",
        "triton>=3.2; platform_system == 'Linux'",
        "numpy",
        "ninja",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6"],
        "bench": ["matplotlib>=3.7", "pytest-benchmark>=4"],
        "hf": ["transformers>=4.57", "accelerate>=0.26", "datasets>=2.14"],
        # csd_kernels.integrations.trl: TRL's on-policy DistillationTrainer (trl >= 1.16)
        "trl": ["trl>=1.16", "transformers>=4.57", "accelerate>=0.26", "datasets>=2.14"],
        # the ZeRO-3 test of CSDTrainer(fused_linear=True) (DeepSpeed's CPU accelerator, gloo)
        "deepspeed": ["deepspeed>=0.15"],
    },
)
