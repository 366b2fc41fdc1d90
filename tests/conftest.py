import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def world_of_one():
    """A gloo process group of one process, for FSDP on the CPU in the test process."""
    from tests.helpers import free_port

    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialized")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}")
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
