"""Weights the other way: a transformers DeepseekV4ForCausalLM (its own random init) saved with
safetensors in its layout, loaded into our model through the checkpoint loader, gives the same
logits."""

import json

import torch
from safetensors.torch import save_file

from batchv4.config import ModelConfig
from batchv4.model.checkpoint import load_checkpoint
from batchv4.model.model import Transformer

from hf_oracle import hf_config, require_transformers

transformers = require_transformers()


def test_transformers_weights_load_into_ours(tmp_path):
    cfg = ModelConfig.load("test").replace(n_mtp_layers=0)
    torch.manual_seed(0)
    hf = transformers.DeepseekV4ForCausalLM(hf_config(cfg)).float().eval()
    with torch.no_grad():   # transformers zero-inits several tensors; make every one matter
        for name, p in hf.named_parameters():
            if not name.endswith("tid2eid"):
                p.add_(torch.randn_like(p) * 0.05)
        for name, b in hf.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.stack([torch.randperm(cfg.n_routed_experts)[:b.shape[1]] for _ in range(b.shape[0])]))
            elif name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.05)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if "rotary" not in k}
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf.config.to_dict()))
    with torch.device("meta"):
        ours = Transformer(cfg)
    load_checkpoint(ours, str(tmp_path), dtype=torch.float32)
    ids = torch.randint(0, 512, (37,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf(ids[None]).logits[0].float()
    assert (ours.forward_reference(ids) - theirs).abs().max() < 1e-4
