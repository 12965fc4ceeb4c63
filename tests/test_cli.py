"""The CLI turns bad input into one line naming the file or key, and exit status 2."""
import json
import subprocess
import sys

from conftest import PREPARE_CFG


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ssl4sci.cli", *args], capture_output=True, text=True)


def test_missing_raw_folder_is_one_line_naming_the_file(tmp_path):
    proc = run_cli("prepare", "--raw", str(tmp_path / "nope"), "--out", str(tmp_path / "data"), "--source", "simulate",
                   "--cfg", json.dumps(PREPARE_CFG))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("ssl4sci prepare: error:")]
    assert lines[0].startswith("ssl4sci prepare: host=")  # where it ran, then the error
    assert len(errors) == 1 and errors[0] == lines[-1] and "nope/images.npy" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()


def test_bad_config_file_names_the_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pretrain:\n  epochs: 0\n")
    proc = run_cli("validate-config", str(cfg))
    assert proc.returncode == 2
    assert proc.stderr.strip() == "ssl4sci validate-config: error: config key 'pretrain.epochs': expected >= 1, got 0"


def test_stage_cfg_must_be_json(tmp_path):
    proc = run_cli("prepare", "--raw", str(tmp_path), "--out", str(tmp_path / "d"), "--source", "simulate",
                   "--cfg", "{not json")
    assert proc.returncode == 2 and "expected JSON" in proc.stderr


def test_config_docs_prints_the_reference():
    proc = run_cli("config-docs")
    assert proc.returncode == 0 and "| `pretrain.epochs` |" in proc.stdout


def test_label_efficiency_without_prepared_data_is_one_line_naming_the_file(tmp_path):
    from conftest import MODEL_CFG, default_section

    proc = run_cli("label-efficiency", "--cfg", json.dumps(default_section("label_efficiency")),
                   "--model", json.dumps(MODEL_CFG), "--data", str(tmp_path / "data"), "--method", "random_init",
                   "--regress-target", "log10_m_axion",
                   "--regress-label", "axion", "--domain", "lensing", "--embeddings", str(tmp_path / "e.parquet"),
                   "--out", str(tmp_path / "out"), "--device", "cpu")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("ssl4sci label-efficiency: error:") and "data/manifest.parquet" in error
    assert not (tmp_path / "out").exists()
