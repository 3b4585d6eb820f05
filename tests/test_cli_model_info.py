import json

from click.testing import CliRunner

from batchv4.config import ModelConfig
from batchv4.model.checkpoint import save_official_checkpoint
from batchv4.model.model import Transformer
from batchv4.pipelines.model_info import model_info


def test_table_flash():
    r = CliRunner().invoke(model_info, ["deepseek-v4-flash"])
    assert r.exit_code == 0, r.output
    assert "284.33 B" in r.output and "6.61 B" in r.output and "13.27 B" in r.output
    assert "69,187" not in r.output and "67,612" in r.output and "1,575" in r.output
    assert "3,514.2 B" in r.output and "3.43 GiB" in r.output


def test_json_pro_with_context():
    r = CliRunner().invoke(model_info, ["deepseek-v4-pro", "--json", "--context", "1000"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["main"]["tensors"] + d["mtp"]["tensors"] == 145_116
    assert d["kv"]["context"] == 1000 and d["kv"]["total_bytes"] == d["kv"]["bytes_per_token"] * 1000
    assert round(d["main"]["active_params"] / 1e9, 1) == 48.9


def test_checkpoint_directory(tmp_path):
    cfg = ModelConfig.load("test")
    save_official_checkpoint(Transformer(cfg).init_random(0), cfg, str(tmp_path))
    r = CliRunner().invoke(model_info, [str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["on_disk"]["tensors"] == d["main"]["tensors"] + d["mtp"]["tensors"]


def test_bad_name_is_one_line_error():
    r = CliRunner().invoke(model_info, ["no-such-model"])
    assert r.exit_code != 0
    assert r.output.startswith("Error: unknown model 'no-such-model'") and r.output.count("\n") == 1
    assert CliRunner().invoke(model_info, ["test", "--context", "-5"]).exit_code != 0


def test_registered_in_group():
    from batchv4.cli import cli

    r = CliRunner().invoke(cli, ["model-info", "test", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["layers"]["mtp"] == 1


def test_config_of_no_dialect_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text('{"vocab": 5, "layers": 3}')
    r = CliRunner().invoke(model_info, [str(tmp_path)])
    assert r.exit_code != 0 and r.output.count("\n") == 1
    assert r.output.startswith("Error: ") and "not a DeepSeek-V4 config" in r.output


def test_stated_layer_kinds_are_reported(tmp_path):
    cfg = ModelConfig.load("test").replace(compress_ratios=(0, 4, 8, 4, 8),
                                           layer_kinds=("window", "hca", "csa", "hca", "csa"))
    save_official_checkpoint(Transformer(cfg).init_random(0), cfg, str(tmp_path))
    r = CliRunner().invoke(model_info, [str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["layers"] == {"window": 1, "csa": 2, "hca": 2, "mtp": 1}
