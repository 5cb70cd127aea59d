"""The ``safeckpt`` command on URLs (issue 14): moto's S3 server and the standard library's HTTP
server on 127.0.0.1, through a subprocess (``python -m safeckpt``) or ``cli.main`` here."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import safeckpt
from safeckpt import cli

pytestmark = [pytest.mark.timeout(300), pytest.mark.usefixtures("backend")]

W = np.arange(256 * 1024, dtype=np.float32).reshape(512, 512)  # 1 MiB: more than a header read


def run(*args, backend, cwd=None):
    """The command in a subprocess with this process's environment (the fixtures' AWS_*
    variables: dummy keys, a region) and this test's backend."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", SAFECKPT_BACKEND=backend)
    return subprocess.run([sys.executable, "-m", "safeckpt", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=120)


@pytest.fixture
def call(capsys):
    """``cli.main`` in this process."""
    def call(*args):
        try:
            code = cli.main(list(map(str, args)))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return call


@pytest.fixture
def bucket(s3, tmp_path):
    """The S3 fixture with model.sckpt in it, and ``endpoint``: the one option the CLI needs
    there (keys and region come from the environment, as on a real machine)."""
    safeckpt.save({"model": {"w": W}, "epoch": 3}, tmp_path / "model.sckpt", metadata={"run": "x"})
    s3.fs.put_file(str(tmp_path / "model.sckpt"), f"{s3.name}/model.sckpt")
    s3.local = tmp_path / "model.sckpt"
    s3.endpoint = f"endpoint_url={s3.server.endpoint}"
    s3.traffic.reset()
    return s3


def test_inspect_and_verify_an_s3_object(bucket, backend):
    """inspect reads the header only (ranged requests, never the 1 MiB of tensor data); verify
    reads every byte and checks it."""
    url = bucket.url("model.sckpt")
    r = run("inspect", url, "--storage-option", bucket.endpoint, backend=backend)
    assert r.returncode == cli.EXIT_OK, r.stderr
    assert f"{url}: sckpt" in r.stdout and "model.w  float32  (512, 512)" in r.stdout
    assert "run: 'x'" in r.stdout
    assert 0 < bucket.traffic.bytes_by_method["GET"] < W.nbytes // 4
    r = run("--storage-option", bucket.endpoint, "inspect", "--json", url, backend=backend)
    desc = json.loads(r.stdout)
    assert desc["path"] == url and desc["tensors"][0]["file"] == "model.sckpt"
    r = run("verify", url, "--storage-option", bucket.endpoint, backend=backend)
    assert r.returncode == cli.EXIT_OK and "OK, 1 tensor" in r.stdout, r.stderr

    data = bytearray(bucket.local.read_bytes())
    data[-1] ^= 1  # a tensor byte: only its checksum notices
    bucket.fs.pipe_file(f"{bucket.name}/model.sckpt", bytes(data))
    r = run("verify", url, "--storage-option", bucket.endpoint, backend=backend)
    assert r.returncode == cli.EXIT_CHECKSUM and "'model.w'" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1


def test_convert_consolidate_and_diff_between_s3_and_local(bucket, call, tmp_path):
    url = bucket.url("model.sckpt")
    opt = ("--storage-option", bucket.endpoint)
    r = call("convert", url, tmp_path / "out.safetensors", *opt)
    assert r.returncode == cli.EXIT_OK, r.stderr
    assert np.array_equal(safeckpt.load_file(tmp_path / "out.safetensors")["model.w"], W)
    r = call("convert", tmp_path / "out.safetensors", bucket.url("copy/model.sckpt"), *opt)
    assert r.returncode == cli.EXIT_OK, r.stderr
    with safeckpt.open(bucket.url("copy/model.sckpt"),
                       storage_options=bucket.storage_options) as f:
        assert np.array_equal(f["model.w"], W)
    r = call("convert", url, bucket.url("copy/other.safetensors"), *opt)
    assert r.returncode == cli.EXIT_OK, r.stderr
    r = call("diff", url, tmp_path / "out.safetensors", *opt)
    assert r.returncode == cli.EXIT_OK and "1 of 1 tensor" in r.stdout, r.stdout + r.stderr
    r = call("consolidate", url, tmp_path / "whole.sckpt", *opt)
    assert r.returncode == cli.EXIT_OK and "referred to no other file" in r.stdout, r.stderr
    assert safeckpt.load(tmp_path / "whole.sckpt")["epoch"] == 3
    r = call("consolidate", url, bucket.url("copy/whole.sckpt"), *opt)
    assert r.returncode == cli.EXIT_OK, r.stderr
    assert safeckpt.load(bucket.url("copy/whole.sckpt"),
                         storage_options=bucket.storage_options)["epoch"] == 3


def test_http_needs_no_options(http_server, tmp_path, backend):
    safeckpt.save_file({"w": W}, tmp_path / "m.sckpt")
    http_server.objects["m.sckpt"] = (tmp_path / "m.sckpt").read_bytes()
    for command in ("inspect", "verify"):
        r = run(command, http_server.url("m.sckpt"), backend=backend)
        assert r.returncode == cli.EXIT_OK and "Traceback" not in r.stderr, r.stderr
    r = run("convert", tmp_path / "m.sckpt", http_server.url("new.sckpt"), backend=backend)
    assert r.returncode == cli.EXIT_USAGE and "read-only" in r.stderr


def test_remote_failures_have_their_exit_codes(http_server, bucket, call, tmp_path):
    """A missing object is 'not found' (5), as a missing file; a storage failure (an error
    status) is EXIT_REMOTE (9): one line naming the URL, no traceback."""
    r = call("inspect", bucket.url("nothing.sckpt"), "--storage-option", bucket.endpoint)
    assert r.returncode == cli.EXIT_NOT_FOUND and "nothing.sckpt" in r.stderr, r.stderr
    http_server.objects["m.sckpt"] = bucket.local.read_bytes()
    http_server.misbehave("status", status=500, after=1)  # the header's GET, then the data's
    r = call("verify", http_server.url("m.sckpt"))
    assert r.returncode == cli.EXIT_REMOTE and http_server.faults.applied, r.stderr
    assert http_server.url("m.sckpt") in r.stderr and len(r.stderr.splitlines()) == 1
    assert "storage_options" not in r.stderr  # the advice names the CLI's flag
    assert "--storage-option" in r.stderr
    assert r.stderr.startswith("safeckpt: error: ") and "Traceback" not in r.stderr


def test_storage_option_values_and_usage_errors(call, tmp_path):
    parse = cli._storage_option
    assert parse("anon=true") == ("anon", True)
    assert parse("endpoint_url=http://127.0.0.1:9000") == ("endpoint_url",
                                                           "http://127.0.0.1:9000")
    assert parse('client_kwargs={"region_name": "eu-west-1"}') == (
        "client_kwargs", {"region_name": "eu-west-1"})
    assert parse("key=1234") == ("key", 1234) and parse('key="1234"') == ("key", "1234")
    assert parse("token=") == ("token", "")
    safeckpt.save_file({"w": W}, tmp_path / "m.sckpt")
    for args, words in [
        (("inspect", tmp_path / "m.sckpt", "--storage-option", "anon=true"), "no path given is"),
        (("inspect", "s3://b/m.sckpt", "--storage-option", "anon"), "is not KEY=VALUE"),
        (("inspect", "s3://b/m.sckpt", "--storage-option", "=1"), "is not KEY=VALUE"),
        (("inspect", "s3://b/m.sckpt", "--storage-option", "anon=true", "--storage-option",
          "anon=false"), "given twice"),
    ]:
        r = call(*args)
        assert r.returncode == cli.EXIT_USAGE and words in r.stderr, (args, r.stderr)


def test_help_documents_urls_storage_options_and_exit_9():
    text = cli.build_parser().format_help()
    assert "9 remote storage failed" in text and "--storage-option" in text
    assert "endpoint_url=" in text
    sub = cli.build_parser()._subparsers._group_actions[0].choices["inspect"].format_help()
    assert "--storage-option KEY=VALUE" in sub and "JSON" in sub
    assert "9     remote storage failed" in cli.__doc__
