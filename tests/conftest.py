import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def models():
    """Cache of tiny models: ``models(family, attn="sdpa", dtype=torch.float32)``."""
    cache = {}

    def get(family, attn="sdpa", dtype=torch.float32):
        key = (family, attn, dtype)
        if key not in cache:
            cache[key] = tiny.build(family, attn=attn, dtype=dtype)
        return cache[key]

    return get
