"""Shared fixtures of the summarize tests."""

import pytest


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny test models run faster that way on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
