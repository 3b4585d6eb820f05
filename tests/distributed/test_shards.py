"""Expert shards without processes: each rank's parameters, loading by rank (tensors read), and the
capacity planner's per-GPU weight bytes against what each rank loads."""

import re

import pytest
import torch

from batchv4.config import ModelConfig
from batchv4.model.checkpoint import load_checkpoint, save_official_checkpoint
from batchv4.model.info import capacity_plan, rank_weight_bytes
from batchv4.model.model import Transformer
from batchv4.model.moe import expert_range

CFG = ModelConfig.load("test")
EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.w[123]\.(weight|scale)$")


def _bytes(model, experts: bool) -> int:
    return sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
               if (".ffn.experts.w" in n) == experts)


@pytest.mark.parametrize("world", [2, 3])
def test_each_rank_holds_its_share_of_the_experts_plus_the_replicated_parts(world):
    with torch.device("meta"):
        full = Transformer(CFG)
        ranks = [Transformer(CFG, expert_shard=(r, world)) for r in range(world)]
    E = CFG.n_routed_experts
    per_expert = _bytes(full, True) // E
    sizes = [expert_range(E, (r, world)) for r in range(world)]
    assert [hi - lo for lo, hi in sizes] == [E // world + (r >= world - E % world) for r in range(world)] or \
        sum(hi - lo for lo, hi in sizes) == E
    for (lo, hi), m in zip(sizes, ranks):
        assert _bytes(m, False) == _bytes(full, False)              # replicated: identical
        assert _bytes(m, True) == (hi - lo) * per_expert            # exactly its experts
    assert sum(_bytes(m, True) for m in ranks) == _bytes(full, True)


def test_random_weights_of_a_shard_are_rows_of_the_whole_model():
    full = Transformer.random(CFG, 3)
    part = Transformer.random(CFG, 3, expert_shard=(1, 2))
    fs = full.state_dict()
    for n, t in part.state_dict().items():
        want = fs[n][4:8] if ".ffn.experts.w" in n else fs[n]
        assert torch.equal(t, want), n


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_official_checkpoint(Transformer(CFG).init_random(1), CFG, str(path))   # bf16 on disk
    with torch.device("meta"):
        whole = Transformer(CFG)
    load_checkpoint(whole, str(path), dtype=torch.float32)
    return str(path), whole


@pytest.mark.parametrize("world", [1, 2, 4])
def test_loading_by_rank_reads_only_its_experts_and_the_planner_counts_the_same_bytes(ckpt, world):
    path, whole = ckpt
    from batchv4.model.checkpoint_files import read_headers

    infos, _ = read_headers(path)
    expert_keys = [k for k in infos if EXPERT.search(k)]
    replicated, experts = rank_weight_bytes(CFG, world)
    plan = capacity_plan(CFG, world, 1 << 30, context=64)
    for r in range(world):
        lo, hi = expert_range(CFG.n_routed_experts, (r, world))
        mine = [k for k in expert_keys if lo <= int(EXPERT.search(k).group(1)) < hi]
        with torch.device("meta"):
            m = Transformer(CFG, expert_shard=(r, world))
        rep = load_checkpoint(m, path, dtype=torch.float32, expert_shard=(r, world))
        assert rep.tensors_read == len(infos) - len(expert_keys) + len(mine)
        assert rep.other_ranks_expert_tensors == len(expert_keys) - len(mine)
        assert rep.bytes_read == replicated + experts[r] == plan.rank_weight_bytes[r]
        ws = whole.state_dict()
        for n, t in m.state_dict().items():
            want = ws[n][lo:hi] if ".ffn.experts.w" in n else ws[n]
            assert torch.equal(t, want), n


@pytest.mark.parametrize("world", [2, 3])
def test_loading_by_rank_from_transformers_stacked_experts_reads_only_its_rows(tmp_path, ckpt, world):
    """transformers' layout stacks a layer's experts in one tensor ([E, 2I, D] gate_up, [E, D, I]
    down): a rank reads its rows of each stack (a view of the mapped file) and the bytes read are
    the planner's for that rank, as with per-expert tensors."""
    from batchv4.model.checkpoint import save_hf_checkpoint

    _, whole = ckpt
    from batchv4.model.checkpoint_files import read_headers

    save_hf_checkpoint(whole.state_dict(), CFG, str(tmp_path))
    infos, _ = read_headers(str(tmp_path))
    ws = whole.state_dict()
    for r in range(world):
        lo, hi = expert_range(CFG.n_routed_experts, (r, world))
        with torch.device("meta"):
            m = Transformer(CFG, expert_shard=(r, world))
        rep = load_checkpoint(m, str(tmp_path), dtype=torch.float32, expert_shard=(r, world))
        assert rep.layout == "hf"
        for n, t in m.state_dict().items():
            if n.startswith("mtp."):          # transformers' layout has no MTP block
                continue
            want = ws[n][lo:hi] if ".ffn.experts.w" in n else ws[n]
            assert torch.equal(t, want.to(t.dtype)), n
        full = load_checkpoint(_meta(), str(tmp_path), dtype=torch.float32, strict=False)
        stacks = [i for k, i in infos.items() if ".experts." in k and "shared" not in k]
        others = sum(i.nbytes // i.shape[0] * (i.shape[0] - (hi - lo)) for i in stacks)
        assert stacks and full.bytes_read - rep.bytes_read == others      # exactly the other ranks' rows


def _meta():
    with torch.device("meta"):
        return Transformer(CFG)


def test_planner_says_when_a_model_does_not_fit():
    flash = ModelConfig.load("deepseek-v4-flash")
    one = capacity_plan(flash, 1, 141 << 30, kv_cache_dtype="fp8")
    assert not one.fits and "does not fit" in one.reason and one.sequences_per_gpu == 0
    eight = capacity_plan(flash, 8, 141 << 30, kv_cache_dtype="fp8")
    assert eight.fits and eight.sequences_per_gpu >= 1
    assert eight.replicated_bytes == one.replicated_bytes
    assert sum(eight.expert_bytes_per_rank) == sum(one.expert_bytes_per_rank)


def test_model_info_gpus_json_and_table():
    import json

    from click.testing import CliRunner

    from batchv4.pipelines.model_info import model_info

    r = CliRunner().invoke(model_info, ["deepseek-v4-flash", "--gpus", "1", "--gpu-memory", "141GiB", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["fits"] is False and d["capacity"]["gpus"] == 1
    r = CliRunner().invoke(model_info, ["deepseek-v4-flash", "--gpus", "4", "--kv-cache-dtype", "fp8",
                                        "--context", "131072"])
    assert r.exit_code == 0 and "weights per GPU" in r.output and "sequences of 131,072 tokens" in r.output
    r = CliRunner().invoke(model_info, ["deepseek-v4-flash", "--gpus", "1"])
    assert r.exit_code == 0 and "DOES NOT FIT" in r.output
