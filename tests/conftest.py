"""Test set-up shared by every test file.

Triton's interpreter must be switched on before triton is imported anywhere, so it is decided here, from the
environment alone (no torch import): on a machine without an NVIDIA driver the Triton kernels run under
TRITON_INTERPRET=1 on CPU tensors.
"""
import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# hypothesis: CI is a 2-core machine; keep property tests bounded and deterministic.
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "mlmfast", max_examples=60, deadline=None, derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile("mlmfast")
except ImportError:  # hypothesis is part of the [test] extra
    pass




@pytest.fixture
def cuda_device():
    import torch

    if not torch.cuda.is_available():
        pytest.fail("this test needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    """A small real-text corpus (the first documents of the built-in corpus), written as a .txt file with one
    document per blank-line-separated paragraph. Available offline on every machine."""
    from mlmfast.data import builtin_corpus

    docs = [d.replace("\n\n", "\n") for d in builtin_corpus()[:400]]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n")
    return path
