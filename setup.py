"""mlmfast packaging.

`kernels/` is installed as `mlmfast.kernels` (a top-level `kernels` package would collide with an existing
PyPI package).
"""
from setuptools import setup

INSTALL_REQUIRES = [
    "torch>=2.11",
    "numpy",
    "triton>=3.6; platform_system == 'Linux'",
    "tokenizers>=0.19",
    "safetensors>=0.4",
    "tqdm",
    "matplotlib",
]
EXTRAS = {
    "hf": ["transformers>=4.40"],
    "test": ["transformers>=4.40", "pytest", "hypothesis"],
}
EXTRAS["all"] = sorted(set(EXTRAS["hf"] + EXTRAS["test"]))

setup(
    name="mlmfast",
    version="0.1.0",
    description="Fast masked-language-model pretraining for BERT-style encoders",
    python_requires=">=3.10",
    packages=["mlmfast", "mlmfast.kernels"],
    package_dir={"mlmfast": "mlmfast", "mlmfast.kernels": "kernels"},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["mlmfast=mlmfast.cli:main"]},
)
