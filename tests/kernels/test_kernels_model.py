"""The model with the Triton kernels on (run by the interpreter here) equals the model with them
off: fused MoE, sparse attention, indexer top-k and mHC inside the packed forward."""

import sys
from pathlib import Path

import torch

from batchv4.config import ModelConfig
from batchv4.model.model import Transformer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
from cache_harness import Harness  # noqa: E402


def test_kernels_on_equal_kernels_off():
    m = Transformer(ModelConfig.load("test")).float().init_random(1, std=0.1)
    ids = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(8)).tolist()
    other = ids[::-1][:13]
    outs = []
    for on in (False, True):
        m.set_kernels(on)
        h = Harness(m)
        a = h.step([(0, ids[:21]), (1, other)])
        b = h.step([(0, ids[21:38]), (1, [5])])
        c = h.step([(0, ids[38:39])])
        outs.append(torch.cat([a, b, c]))
    m.set_kernels(False)
    assert (outs[0] - outs[1]).abs().max() < 2e-3, (outs[0] - outs[1]).abs().max()
