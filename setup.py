"""keras_favor: Performer (FAVOR+) attention for Keras 3 and TensorFlow."""

from setuptools import find_packages, setup

setup(
    name="keras_favor",
    version="0.1.0",
    description="Performer (FAVOR+) linear attention for Keras 3 and TensorFlow.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_favor", "keras_favor.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.12",
        "numpy",
    ],
    extras_require={
        "export": ["ai-edge-litert", "tensorflow-serving-api>=2.21,<2.22"],
        "tests": [
            "pytest>=8",
            "pytest-xdist>=3.2",
            "hypothesis>=6",
            "jax[cpu]",
            "ai-edge-litert",
            "tensorflow-serving-api>=2.21,<2.22",
            "psutil",
            "matplotlib",
            "safetensors",
            "tokenizers",
        ],
        "benchmarks": ["matplotlib", "jax[cpu]", "psutil"],
    },
    license="Apache-2.0",
)
