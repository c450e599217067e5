import pytest
import torch

from albef_ray.config import build_config
from albef_ray.model.registry import list_sizes


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def tiny_cfg(**sections):
    """Config for albef_tiny with no hub weights, a small queue and one worker of batch 4."""
    data = {
        "model": {"size": "albef_tiny", "vit_init": None, "bert_init": None},
        "momentum": {"queue_size": 32},
        "train": {"batch_size": 4, "num_workers": 1},
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return build_config(data)


def make_batch(arch, b=4, t=10, seed=0):
    """Images and captions with [CLS] ... [SEP] and some padding, ids from the arch's vocab."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, arch.image_res, arch.image_res, generator=g)
    ids = torch.randint(200, arch.vocab_size, (b, t), generator=g)
    att = torch.ones(b, t, dtype=torch.long)
    ids[:, 0] = 101
    for i in range(b):
        length = t - (i % 3)  # rows of different lengths
        ids[i, length - 1] = 102
        ids[i, length:] = 0
        att[i, length:] = 0
    return image, ids, att


ALL_SIZES = list_sizes()
