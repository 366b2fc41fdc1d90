import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

try:  # the fuzz tests' budgets (tests/fuzzing.py): HYPOTHESIS_PROFILE=fuzz runs 20 times as many examples
    from hypothesis import settings as hypothesis_settings
except ImportError:  # hypothesis comes with the dev extra
    pass
else:
    hypothesis_settings.register_profile("ci", deadline=None, database=None, print_blob=True)
    hypothesis_settings.register_profile("fuzz", hypothesis_settings.get_profile("ci"), max_examples=2000)
    hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
