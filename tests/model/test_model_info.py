import pytest

from batchv4.config import ModelConfig
from batchv4.model.info import indexer_key_bytes, kv_entry_bytes, kv_sizes, model_info


@pytest.fixture(scope="module")
def flash():
    return model_info(ModelConfig.load("deepseek-v4-flash"))


@pytest.fixture(scope="module")
def pro():
    return model_info(ModelConfig.load("deepseek-v4-pro"))


def test_flash_sizes(flash):
    assert flash.cross_check == []
    assert flash.layers == {"window": 2, "csa": 21, "hca": 20, "mtp": 1}
    assert flash.main.params == 284_332_240_471
    assert flash.mtp.params == 6_610_048_891
    assert flash.main.params + flash.mtp.params == 290_942_289_362   # [NANO]'s logical parameter count
    assert 13.2e9 < flash.main.active_params < 13.35e9
    assert flash.main.tensors + flash.mtp.tensors == 69_187 and flash.mtp.tensors == 1_575
    assert abs((flash.main.checkpoint_bytes + flash.mtp.checkpoint_bytes) / 1e9 - 159.6) < 0.1


def test_pro_sizes(pro):
    assert pro.cross_check == []
    assert round(pro.main.params / 1e9, 1) == 1573.0
    assert round(pro.mtp.params / 1e9, 2) == 25.84
    assert 48.8e9 < pro.main.active_params < 49.0e9
    assert pro.main.tensors + pro.mtp.tensors == 145_116


def test_kv_bytes(flash, pro):
    cfg = ModelConfig.load("deepseek-v4-flash")
    assert kv_entry_bytes(cfg) == 584 and indexer_key_bytes(cfg) == 68
    assert flash.kv.bytes_per_token == pytest.approx(21 * 163 + 20 * 4.5625)      # 3,514.25
    assert flash.kv.total_bytes / 2 ** 30 == pytest.approx(3.43, abs=0.005)
    assert flash.kv.window_bytes == 43 * 128 * 584
    assert flash.kv.pending_bytes == 20 * 128 * 512 * 2 * 4 + 21 * 8 * 2 * (1024 + 256) * 4
    assert pro.kv.bytes_per_token == pytest.approx(30 * 163 + 31 * 4.5625)        # 5,031.4
    assert kv_sizes(cfg, 1000).total_bytes == pytest.approx(3514.25 * 1000)


def test_small_config_and_bad_context():
    info = model_info(ModelConfig.load("test"), context=64)
    assert info.cross_check == []
    assert info.mtp.params > 0 and info.main.active_params < info.main.params
    with pytest.raises(ValueError, match="context"):
        model_info(ModelConfig.load("test"), context=-1)
