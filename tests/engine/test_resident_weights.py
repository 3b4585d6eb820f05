"""An FP8/FP4 checkpoint loaded by the engine keeps its quantized weights resident (FP8 linears,
packed FP4 experts, their scales) and generates what the same checkpoint dequantized at load does."""

import re

import torch

from batchv4.config import ModelConfig
from batchv4.engine.llm import LLM
from batchv4.engine.sampling_params import SamplingParams
from batchv4.model.checkpoint import save_official_checkpoint
from batchv4.model.model import Transformer


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def test_fp8_fp4_checkpoint_stays_quantized_and_generates_the_same(tmp_path):
    cfg = ModelConfig.load("test")
    save_official_checkpoint(Transformer(cfg).init_random(2, std=0.1), cfg, str(tmp_path), fp8=True, fp4_experts=True)
    kw = dict(device="cpu", dtype="float32", kv_cache_memory="16MiB", max_num_seqs=4)
    resident = LLM(str(tmp_path), quantized_weights="resident", **kw)
    plain = LLM(str(tmp_path), quantized_weights="dequantize", **kw)
    sd = resident.model.state_dict()
    dtypes = {str(t.dtype) for n, t in sd.items() if re.search(r"\.ffn\.experts\.w[123]$", n)}
    assert dtypes == {"torch.uint8"}                                        # packed FP4 experts
    assert any(t.dtype == torch.float8_e4m3fn for n, t in sd.items() if ".attn." in n)
    assert any(n.endswith("scale") for n in sd)
    assert not any(t.dtype in (torch.float8_e4m3fn, torch.uint8) for t in plain.model.state_dict().values())
    assert _bytes(resident.model) < 0.6 * _bytes(plain.model)
    prompts = [{"prompt_token_ids": list(range(5 + i, 40 + 3 * i))} for i in range(3)]
    sp = SamplingParams(max_tokens=6, temperature=0.0)
    a = [o.outputs[0].token_ids for o in resident.generate(prompts, sp)]
    b = [o.outputs[0].token_ids for o in plain.generate(prompts, sp)]
    assert a == b
    ids = torch.tensor(prompts[0]["prompt_token_ids"])
    with torch.no_grad():
        la, lb = resident.model.forward_reference(ids), plain.model.forward_reference(ids)
    assert (la - lb).abs().max() < 1e-5
