import os

import pytest
import torch

os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
