"""Packaging for cmi_clip: zero-shot industrial anomaly detection with CLIP."""

from pathlib import Path

from setuptools import find_packages, setup

README = Path(__file__).parent / "README.md"

setup(
    name="cmi_clip",
    version="0.1.0",
    description=(
        "Zero-shot industrial anomaly detection and localization with CLIP, "
        "cross-view mutual interaction and cross-view learning, in the style of transformers."
    ),
    long_description=README.read_text(encoding="utf-8") if README.exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"cmi_clip": ["prompts/*.json", "model_cards/*.md", "metrics_module/*.py"]},
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=4.57",
        "accelerate>=1.0",
        "datasets>=3.0",
        "evaluate>=0.4",
        "huggingface_hub>=0.34",
        "safetensors>=0.4",
        "numpy>=1.24",
        "scipy>=1.10",
        "scikit-learn>=1.3",
        "scikit-image>=0.22",
        "Pillow>=10.0",
        "tqdm>=4.66",
        "matplotlib>=3.7",
    ],
    extras_require={
        # open_clip_torch ships CLIP's BPE vocabulary (used to build a tokenizer offline) and is the
        # reference for the checkpoint-conversion parity tests. It imports torchvision.
        "convert": ["open_clip_torch>=2.24"],
        "dev": ["open_clip_torch>=2.24", "pytest>=8", "pytest-timeout>=2.3", "tensorboard>=2.15"],
    },
    entry_points={"console_scripts": ["cmi-clip=cmi_clip.cli:main"]},
)
