import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: intra-op threads only add contention on a 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
