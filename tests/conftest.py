"""Fixtures shared by several test modules."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The embedded demo dataset and its shards (examples/prepare_demo_data.py), built once per test session."""
    from prepare_demo_data import main

    out = tmp_path_factory.mktemp("demo_data")
    main(str(out))
    return out


def randomise_hf(model):
    """HF inits norms to 1 and biases to 0: randomise every tensor so a mis-mapped one cannot hide."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_((0.1 if p.ndim == 1 else 0.05) * torch.randn_like(p))
    return model
