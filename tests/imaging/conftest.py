import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    """These tests run tiny tensors, where intra-op threads only add contention on shared CI
    cores (a 10-100x slowdown measured on a busy 2-core machine); restore the setting after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
