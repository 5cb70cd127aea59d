"""The ``safeckpt`` command, end to end through a subprocess (``python -m safeckpt``)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import safeckpt
from safeckpt import cli


def run(*args, cwd=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "safeckpt", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


@pytest.fixture
def files(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    safeckpt.save({"model": {"w": w, "tied": w}, "epoch": 3}, tmp_path / "a.sckpt",
                  metadata={"run": "x", "lr": [1e-3]})
    b = {"model.w": w + np.float32(0.5), "extra": np.zeros(2, np.int8)}
    safeckpt.save_file(b, tmp_path / "b.sckpt")
    return tmp_path


def test_inspect_prints_the_table_totals_metadata_and_tree(files):
    r = run("inspect", files / "a.sckpt")
    assert r.returncode == cli.EXIT_OK and r.stderr == ""
    assert "model.w  float32  (3, 4)     48" in r.stdout
    assert "total: 1 tensors, 48 bytes" in r.stdout
    assert 'lr: [0.001]' in r.stdout
    assert "'tied': same tensor as model.w" in r.stdout and "'epoch': 3" in r.stdout


def test_inspect_json(files):
    r = run("inspect", "--json", files / "a.sckpt")
    desc = json.loads(r.stdout)
    assert desc["format"] == "sckpt" and desc["version"] == "1.1" and desc["checksums"]
    assert desc["tensors"][0]["name"] == "model.w" and desc["tensors"][0]["shape"] == [3, 4]
    assert desc["tensor_bytes"] == 48 and desc["metadata"] == {"run": "x", "lr": [0.001]}
    assert desc["tree"]["type"] == "dict" and desc["tree"]["items"][1] == ["epoch", 3]


def test_verify_passes_and_names_the_first_problem(files):
    r = run("verify", files / "a.sckpt", files / "b.sckpt")
    assert r.returncode == cli.EXIT_OK and r.stdout.count("OK") == 2
    data = bytearray((files / "b.sckpt").read_bytes())
    data[-1] ^= 1  # a tensor byte: only its checksum notices
    (files / "bad.sckpt").write_bytes(bytes(data))
    r = run("verify", files / "a.sckpt", files / "bad.sckpt")
    assert r.returncode == cli.EXIT_CHECKSUM
    assert "checksum mismatch" in r.stderr and "'extra'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, code, words", [
    (("inspect", "missing.sckpt"), cli.EXIT_NOT_FOUND, "No such file"),
    (("verify", "notckpt.sckpt"), cli.EXIT_BAD_FILE, "magic"),
    (("inspect", "a.sckpt/x.sckpt"), cli.EXIT_OS_ERROR, "Not a directory"),
    (("frobnicate",), cli.EXIT_USAGE, "invalid choice"),
    (("convert", "a.sckpt", "a.txt"), cli.EXIT_USAGE, "unknown output format"),
    (("diff", "a.sckpt"), cli.EXIT_USAGE, "required"),
])
def test_bad_input_exits_with_its_code_and_one_line(files, args, code, words):
    (files / "notckpt.sckpt").write_bytes(b"PK\x03\x04" + bytes(60))
    r = run(*args, cwd=files)
    assert r.returncode == code, r.stderr
    assert words in r.stderr and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("safeckpt: error:")


def test_convert_round_trip_and_diff(files):
    r = run("convert", files / "a.sckpt", files / "a.safetensors")
    assert r.returncode == cli.EXIT_OK and "1 tensors" in r.stdout
    r = run("convert", "--progress", files / "a.safetensors", files / "a2.sckpt")
    assert r.returncode == cli.EXIT_OK and ("100%" in r.stderr or "convert" in r.stderr)
    r = run("diff", files / "a.sckpt", files / "a2.sckpt")
    assert r.returncode == cli.EXIT_OK and "0 differences" in r.stdout
    r = run("diff", files / "a.sckpt", files / "b.sckpt")
    assert r.returncode == cli.EXIT_DIFFERENT
    assert "~ model.w: max abs diff 0.5" in r.stdout
    assert "+ extra: only in" in r.stdout and "- metadata['run']" in r.stdout


def test_convert_refuses_a_pickle_only_source(files):
    np.save(files / "obj.npy", np.array([object()], dtype=object), allow_pickle=True)
    r = run("convert", files / "obj.npy", files / "o.sckpt")
    assert r.returncode == cli.EXIT_BAD_FILE and "never unpickles" in r.stderr
    assert not (files / "o.sckpt").exists()


def test_the_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "safeckpt")
    if not os.path.exists(script):
        pytest.skip("the package is not installed with its scripts here")
    r = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("safeckpt ")


def test_diff_max_abs_diff_is_exact_for_ints_and_handles_nan():
    big = np.array([0, 2**64 - 1], np.uint64)
    assert cli._max_abs_diff(big, big[::-1].copy()) == 2**64 - 1
    x = np.array([np.nan, 1.0], np.float32)
    assert cli._max_abs_diff(x, np.array([np.nan, 1.5], np.float32)) == 0.5
    assert np.isnan(cli._max_abs_diff(x, np.array([0.0, 1.0], np.float32)))
