import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_random_dir(tmp_path_factory):
    """A random tiny DeepSeek-V3 checkpoint in the HF release layout (MTP layer included)."""
    from nmoe.serve.ckpt import make_tiny

    out = tmp_path_factory.mktemp("tiny_random")
    make_tiny(str(out), seed=7)
    return str(out)
