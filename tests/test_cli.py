"""The ``safeckpt`` command, end to end through a subprocess (``python -m safeckpt``) or
``cli.main`` in this process."""

import collections
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


@pytest.fixture
def call(files, monkeypatch, capsys):
    """``cli.main`` in this process, in the files' directory: faster than ``run`` (no start-up)."""
    monkeypatch.chdir(files)

    def call(*args):
        try:
            code = cli.main(list(map(str, args)))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return call


def test_inspect_prints_the_table_totals_metadata_and_tree(files):
    r = run("inspect", files / "a.sckpt")
    assert r.returncode == cli.EXIT_OK and r.stderr == ""
    assert "model.w  float32  (3, 4)     48" in r.stdout
    assert "total: 1 tensor, 48 bytes" in r.stdout
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
    assert r.returncode == cli.EXIT_OK and ": 1 tensor, " in r.stdout
    r = run("convert", "--progress", files / "a.safetensors", files / "a2.sckpt")
    assert r.returncode == cli.EXIT_OK and ("100%" in r.stderr or "convert" in r.stderr)
    r = run("diff", files / "a.sckpt", files / "a2.sckpt")
    assert r.returncode == cli.EXIT_OK and "0 differences" in r.stdout
    r = run("diff", files / "a.sckpt", files / "b.sckpt")
    assert r.returncode == cli.EXIT_DIFFERENT
    assert "~ model.w: max abs diff 0.5" in r.stdout
    assert "+ extra: only in" in r.stdout and "- metadata['run']" in r.stdout


def test_convert_max_shard_size_writes_huggingface_shards(call, files):
    safeckpt.save_file({f"w{i}": np.full(100, i, np.float32) for i in range(3)}, files / "m.sckpt")
    (files / "hf").mkdir()
    r = call("convert", "m.sckpt", "hf/model.safetensors", "--max-shard-size", "800")
    assert r.returncode == cli.EXIT_OK and ": 3 tensors, " in r.stdout, r.stderr
    assert sorted(os.listdir(files / "hf")) == [f"model-0000{j}-of-00002.safetensors" for j in (1, 2)] + [
        "model.safetensors.index.json"]
    r = call("inspect", "hf")
    assert r.returncode == cli.EXIT_OK and "safetensors" in r.stdout and "w2" in r.stdout
    r = call("convert", "m.sckpt", "x.sckpt", "--max-shard-size", "5 parsecs")
    assert r.returncode == cli.EXIT_USAGE and "--max-shard-size" in r.stderr and "5GB" in r.stderr
    assert not (files / "x.sckpt").exists()


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


@pytest.mark.parametrize("name", ["complex64", "complex128", "complex32", "bcomplex32"])
def test_diff_of_complex_dtypes_counts_the_imaginary_part(tmp_path, name):
    """Every complex code (15, 16, 33, 34; ml_dtypes' bcomplex32 has numpy kind 'V', not 'c') is
    compared as complex: a change in the imaginary part alone is |3j| = 3, never 0."""
    import ml_dtypes
    dtype = np.dtype(getattr(ml_dtypes, name, None) or name)
    a = np.array([1 + 1j, 2 + 2j], np.complex64).astype(dtype)
    b = np.array([1 + 1j, 2 + 5j], np.complex64).astype(dtype)
    assert cli._max_abs_diff(a, b) == 3.0
    safeckpt.save_file({"c": a}, tmp_path / "a.sckpt")
    safeckpt.save_file({"c": b}, tmp_path / "b.sckpt")
    r = run("diff", str(tmp_path / "a.sckpt"), str(tmp_path / "b.sckpt"))
    assert r.returncode == cli.EXIT_DIFFERENT and "~ c: max abs diff 3" in r.stdout, r.stdout
    assert "ComplexWarning" not in r.stderr


# -- trust: nothing from a file reaches the terminal raw; every outcome has its own exit code ------

HOSTILE = "w\x1b]52;c;cHduZWQ=\x07\x1b[2J\n\r\u202eevil\u2066\x85\x7f\u200b\\x1b"


def assert_inert(text):
    """No character a terminal acts on: only printable characters and line ends."""
    bad = sorted({c for c in text if not (c.isprintable() or c == "\n")})
    assert not bad, bad


def test_escape_shows_what_a_terminal_would_act_on_and_keeps_unicode():
    assert cli._escape("héllo 中文 ü.w") == "héllo 中文 ü.w"
    assert cli._escape("a\x1b[2J\n\x85\x7f\u202e\u2066\u200b\u2028\ud800") == \
        "a\\x1b[2J\\n\\x85\\x7f\\u202e\\u2066\\u200b\\u2028\\ud800"
    assert cli._escape("a\\x1b") == "a\\\\x1b"  # a literal backslash never looks like an escape
    assert cli._escape("a\\b\x1b", backslash=False) == "a\\b\\x1b"


def test_inspect_verify_diff_convert_escape_names_keys_and_values_from_the_file(files, call):
    w = np.arange(3, dtype=np.float32)
    safeckpt.save({"model": {HOSTILE: w, "b": w * 2}, HOSTILE: "v" + HOSTILE, "s": np.float32(1)},
                  files / "h.sckpt", metadata={HOSTILE: HOSTILE})
    safeckpt.save_file({"model." + HOSTILE: w + 1, "x" + HOSTILE: w}, files / "h2.sckpt",
                       metadata={HOSTILE: 1})
    for args in (("inspect", "h.sckpt"), ("inspect", "--json", "h.sckpt"), ("verify", "h.sckpt"),
                 ("diff", "h.sckpt", "h2.sckpt"), ("convert", "h.sckpt", "h.safetensors"),
                 ("inspect", "h.safetensors"), ("diff", "h.safetensors", "h2.sckpt")):
        r = call(*args)
        assert r.returncode in (cli.EXIT_OK, cli.EXIT_DIFFERENT), (args, r.stderr)
        assert_inert(r.stdout + r.stderr)
    r = run("inspect", "h.sckpt", cwd=files)
    assert "model.w\\x1b]52;c;cHduZWQ=\\x07\\x1b[2J\\n\\r\\u202eevil\\u2066\\x85\\x7f\\u200b\\\\x1b" \
        in r.stdout
    r = call("diff", "h.sckpt", "h2.sckpt")
    assert "+ xw\\x1b]52" in r.stdout and "~ model.w\\x1b]52" in r.stdout


def test_error_messages_are_escaped_too(files):
    r = run("inspect", "gone\x1b[2J\u202e.sckpt", cwd=files)
    assert r.returncode == cli.EXIT_NOT_FOUND and "gone\\x1b[2J\\u202e.sckpt" in r.stderr
    assert_inert(r.stderr)
    # a safetensors name with a lone surrogate (JSON allows the escape) cannot even be encoded raw
    header = json.dumps({"\ud800\x1b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 5]}})
    data = header.encode()
    (files / "s.safetensors").write_bytes(len(data).to_bytes(8, "little") + data + bytes(5))
    for command in ("inspect", "verify"):
        r = run(command, "s.safetensors", cwd=files)
        assert r.returncode == cli.EXIT_BAD_FILE and "Traceback" not in r.stderr
        assert_inert(r.stdout + r.stderr)


def test_inspect_json_holds_every_value_type_of_a_tree_and_metadata(files, call):
    from safeckpt.dtypes import DTYPE_BY_CODE
    w = np.ones(2, np.float32)
    values = [None, True, False, 0, -2**63, 2**64 - 1, 2**53 + 1, "é\x1b", b"\x00\xff", 1.5, -0.0,
              float("nan"), float("inf"), float("-inf"), [1, [2]], (1, (2,)), {3: "int key", "3": 4}]
    scalars = [np.zeros((), dt)[()] for dt in DTYPE_BY_CODE] + [np.complex128(1 + 2j),
                                                                np.float64("nan")]
    obj = {"values": values, "scalars": scalars, "w": w, "tied": w,
           "odict": collections.OrderedDict(a=1), 7: ()}
    metadata = {"m": [None, True, -2**63, 2**64 - 1, 1.5, float("nan"), "s", b"\x01", {"k": [1]}]}
    safeckpt.save(obj, files / "all.sckpt", metadata=metadata)
    r = call("inspect", "--json", "all.sckpt")
    assert r.returncode == cli.EXIT_OK, r.stderr

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")
    desc = json.loads(r.stdout, parse_constant=refuse)
    tree = desc["tree"]["items"]
    got = dict((k, v) for k, v in tree)
    plain = got["values"]["items"]
    assert plain[:5] == [None, True, False, 0, {"int": str(-2**63)}]
    assert plain[5:8] == [{"int": str(2**64 - 1)}, {"int": str(2**53 + 1)}, "é\x1b"]
    assert plain[8] == {"base64": "AP8="} and plain[9] == 1.5 and str(plain[10]) == "-0.0"
    assert plain[11:14] == [{"float": "nan"}, {"float": "inf"}, {"float": "-inf"}]
    assert plain[15] == {"type": "tuple", "items": [1, {"type": "tuple", "items": [2]}]}
    assert plain[16] == {"type": "dict", "items": [[3, "int key"], ["3", 4]]}
    kinds = {s["scalar"]: s["value"] for s in got["scalars"]["items"][:-2]}
    assert len(kinds) == len(DTYPE_BY_CODE)
    assert got["scalars"]["items"][-2] == {"scalar": "complex128", "value": {"complex": [1.0, 2.0]}}
    assert got["scalars"]["items"][-1]["value"] == {"float": "nan"}
    assert [k for k, _ in tree][-1] == 7 and got["tied"] == {"tensor": "w"}
    assert desc["metadata"]["m"][2:4] == [{"int": str(-2**63)}, {"int": str(2**64 - 1)}]
    assert desc["metadata"]["m"][5] == {"float": "nan"}
    assert desc["metadata"]["m"][7] == {"base64": "AQ=="}
    r = call("inspect", "all.sckpt")
    assert r.returncode == cli.EXIT_OK and "complex128 scalar" in r.stdout, r.stderr


def _json(value):
    return json.loads("".join(cli._json_pieces(cli._jsonable(value))))


def test_jsonable_is_total():
    class Odd:
        def __repr__(self):
            return "Odd()"
    assert _json({"a": Odd(), 1: np.float16(2)}) == \
        {"type": "dict", "items": [["a", {"repr": "Odd()"}], [1, 2.0]]}


@pytest.mark.parametrize("value", [
    None, True, 0, -1.5, "", "é\x1b\ud800", [], {}, [[]], {"a": {}}, [1, [2, [3, {"k": []}]], {}],
    {"a": [1, 2], "b": {"c": None, "": "x"}, "\u2028": [[], {}, [[[]]]]}, [1e300, -0.0, 2**53],
])
def test_json_pieces_lay_out_json_as_json_dump_with_indent_2(value):
    """inspect --json streams its output; the text is what json.dump(indent=2) writes."""
    assert "".join(cli._json_pieces(cli._jsonable(value))) == json.dumps(value, indent=2)


def test_json_pieces_go_as_deep_as_a_file_may_nest_without_recursion():
    value = {"k": []}
    for _ in range(5000):  # far deeper than Python's recursion limit
        value = [value]
    text = "".join(cli._json_pieces(cli._jsonable(value)))
    assert text.startswith("[\n  [\n    [") and text.count("[") == text.count("]") == 5001
    assert "\n" + "  " * 5000 + '{\n' + "  " * 5001 + '"k": []\n' + "  " * 5000 + "}\n" in text


def test_inspect_shows_long_values_cut_short_with_their_size_and_json_in_full(files, call):
    """Text output is for a person: a value of 300,000 items is shown in one short line that says
    how large it is (and it costs no memory per item); --json holds every item."""
    n = 300_000
    safeckpt.save({"w": np.zeros(1), "s": [None] * n, "t": "x" * n},
                  files / "long.sckpt", metadata={"m": [[] for _ in range(n)], "b": b"\x00" * n,
                                                  "short": [1, "a"]})
    r = call("inspect", "long.sckpt")
    assert r.returncode == cli.EXIT_OK, r.stderr
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) < 2 * cli.VALUE_MAX
    m = next(line for line in lines if line.startswith("  m: "))
    assert m.startswith("  m: [[], [], [], ")
    assert m.endswith(" (300,000 items in all; --json shows all)")
    assert any(line.startswith("  b: b'\\x00\\x00") and line.endswith("(300,000 bytes in all; "
                                                                      "--json shows all)")
               for line in lines)
    assert "  short: [1, 'a']" in lines
    assert "    's': list (300000)" in lines and "      0: None" in lines
    assert lines[-1] == f"  ... (outline cut at {cli.OUTLINE_MAX_LINES} lines; --json shows all)"
    desc = json.loads(call("inspect", "--json", "long.sckpt").stdout)
    assert desc["metadata"]["m"] == [[]] * n and desc["metadata"]["short"] == [1, "a"]
    tree = dict(desc["tree"]["items"])
    assert tree["s"] == {"type": "list", "items": [None] * n} and tree["t"] == "x" * n


def test_limit_flags_work_after_the_subcommand_and_errors_name_the_flag(files, call):
    safeckpt.save_file({"x": np.zeros(1), "y": np.zeros(1)}, files / "m.sckpt",
                       metadata={"m": "a" * 5000})
    for args in (("inspect", "m.sckpt", "--max-header-size", "1000"),
                 ("--max-header-size", "1000", "verify", "m.sckpt"),
                 ("--max-header-size", "10000000", "inspect", "--max-header-size=1000", "m.sckpt")):
        r = call(*args)
        assert r.returncode == cli.EXIT_BAD_FILE, (args, r.stderr)
        assert "--max-header-size=" in r.stderr and "max_header_size" not in r.stderr
    assert call("inspect", "m.sckpt", "--max-header-size", "100000").returncode == 0
    assert call("--max-header-size", "100000", "diff", "m.sckpt", "m.sckpt").returncode == 0
    r = call("verify", "--max-tensors", "1", "m.sckpt")
    assert r.returncode == cli.EXIT_BAD_FILE and "--max-tensors=" in r.stderr
    r = call("convert", "m.sckpt", "m2.sckpt", "--max-header-size", "0")
    assert r.returncode == cli.EXIT_USAGE


def test_max_expansion_flag_of_convert_and_diff(files, call):
    """A compressed .npz of zeros expands past the default 16x: refused naming the flag, which
    convert and diff take to accept it (SECURITY.md, Conversions)."""
    np.savez_compressed(files / "z.npz", a=np.zeros(1 << 16))
    for args in (("convert", "z.npz", "z.sckpt"), ("diff", "z.npz", "z.npz")):
        r = call(*args)
        assert r.returncode == cli.EXIT_BAD_FILE, (args, r.stderr)
        assert "--max-expansion=" in r.stderr and "max_expansion" not in r.stderr
        assert call(*args, "--max-expansion", "10000").returncode == 0, args
    assert safeckpt.load_file(files / "z.sckpt")["a"].shape == (1 << 16,)
    assert call("inspect", "z.sckpt", "--max-expansion", "10").returncode == cli.EXIT_USAGE


@pytest.mark.parametrize("name", ["x.npz", "x.npy", "x.pt", "x.bin"])
@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_inspect_and_verify_of_a_file_to_convert_say_how(files, call, name, command):
    if name == "x.npz":
        np.savez(files / name, a=np.zeros(2))
    elif name == "x.npy":
        np.save(files / name, np.zeros(2))
    else:  # torch.save writes a zip archive
        import zipfile
        with zipfile.ZipFile(files / name, "w") as z:
            z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    r = call(command, name)
    assert r.returncode == cli.EXIT_BAD_FILE and "Traceback" not in r.stderr
    assert f"safeckpt convert {name} " in r.stderr


def test_counts_are_singular_and_plural(files, call):
    r = call("inspect", "a.sckpt")
    assert ", 1 tensor, " in r.stdout and "total: 1 tensor, 48 bytes" in r.stdout
    assert "1 tensors" not in r.stdout
    r = call("inspect", "b.sckpt")
    assert ", 2 tensors, " in r.stdout
    r = call("convert", "a.sckpt", "c.sckpt")
    assert r.stdout.endswith(": 1 tensor, 48 B\n")
    r = call("diff", "a.sckpt", "c.sckpt")
    assert r.stdout == "1 of 1 tensor in a.sckpt identical; 0 differences\n"
    r = call("verify", "a.sckpt")
    assert "OK, 1 tensor," in r.stdout


def test_verify_of_a_file_without_checksums_does_not_say_ok(files, call):
    safeckpt.save_file({"x": np.zeros(2)}, files / "n.sckpt", checksum=False)
    from safetensors.numpy import save_file
    save_file({"x": np.zeros(2)}, str(files / "n.safetensors"))
    for name, why in (("n.sckpt", "saved without checksums"), ("n.safetensors", "safetensors")):
        r = call("verify", name)
        assert r.returncode == cli.EXIT_NO_CHECKSUMS, r.stderr
        assert ": OK" not in r.stdout and "no checksums to verify; structure OK" in r.stdout
        assert why in r.stdout
    r = call("verify", "a.sckpt", "n.sckpt")
    assert r.returncode == cli.EXIT_NO_CHECKSUMS
    r = call("verify", "n.sckpt", "missing.sckpt", "a.sckpt")
    assert r.returncode == cli.EXIT_NOT_FOUND and r.stdout.count("\n") == 2


def _safetensors(path, entry, data=b""):
    header = json.dumps({"a": entry}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": [0, 4611686018427387904], "data_offsets": [0, 0]},
    {"dtype": "I16", "shape": [0, 2**63 - 1], "data_offsets": [0, 0]},
    {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]},
    {"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]},
])
def test_a_hostile_safetensors_file_is_a_bad_file_for_every_command(files, call, entry):
    _safetensors(files / "h.safetensors", entry, bytes(entry["data_offsets"][1]))
    for args in (("inspect", "h.safetensors"), ("inspect", "--json", "h.safetensors"),
                 ("verify", "h.safetensors"), ("convert", "h.safetensors", "o.sckpt"),
                 ("diff", "h.safetensors", "a.sckpt")):
        r = call(*args)
        assert r.returncode == cli.EXIT_BAD_FILE, (args, r.returncode, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr and ": OK" not in r.stdout
        assert len(r.stderr.splitlines()) == 1


def test_usage_is_exit_2_only_for_arguments(files, call):
    assert call("convert", "a.sckpt", "o.sckpt", "--align", "3").returncode == cli.EXIT_USAGE
    assert call("convert", "a.sckpt", "o.txt").returncode == cli.EXIT_USAGE
    for exc in (ValueError("array is too big"), TypeError("x"), KeyError("x"), RecursionError()):
        assert cli._exit_code(exc) == cli.EXIT_BUG
    assert cli._exit_code(safeckpt.SafeckptError("x")) == cli.EXIT_BAD_FILE


def test_an_unexpected_exception_is_reported_as_a_bug_in_one_line(files, monkeypatch, capsys):
    def broken(path, **limits):
        raise TypeError("unhashable \x1b[2J 'list'")
    monkeypatch.setattr(safeckpt.api, "open", broken)
    assert cli.main(["inspect", str(files / "a.sckpt")]) == cli.EXIT_BUG
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("safeckpt: internal error (a bug in safeckpt; please report it")
    assert "TypeError: unhashable \\x1b[2J 'list'" in err
    assert cli.main(["inspect", "--traceback", str(files / "a.sckpt")]) == cli.EXIT_BUG
    assert "Traceback" in capsys.readouterr().err


def test_each_tensor_is_looked_up_a_constant_number_of_times(files, monkeypatch):
    """Per-name work in the CLI is O(1): no re-listing of names and no repeated lookups per
    tensor (R2: such a loop is quadratic in the tensor count)."""
    n = 200
    tensors = {f"t{i}": np.full(2, i, np.float32) for i in range(n)}
    safeckpt.save({"model": tensors, "tied": tensors["t0"]}, files / "n1.sckpt")
    safeckpt.save({"model": tensors}, files / "n2.sckpt")
    _save_linked(files, tensors)  # step-2.sckpt refers to step-1.sckpt for n + 1 tensors
    calls = collections.Counter()
    real_open = safeckpt.api.open

    class Counting:
        def __init__(self, reader):
            self._reader = reader

        def __getattr__(self, name):
            value = getattr(self._reader, name)
            if name in ("keys", "info", "get_slice", "__contains__"):
                def counted(*args, **kwargs):
                    calls[(name, *args)] += 1
                    return value(*args, **kwargs)
                return counted
            return value

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._reader.close()

        def __len__(self):
            return len(self._reader)

        def __iter__(self):
            calls[("keys",)] += 1
            return iter(self._reader)

        def __getitem__(self, name):
            calls[("getitem", name)] += 1
            return self._reader[name]

        def __contains__(self, name):
            calls[("contains", name)] += 1
            return name in self._reader

    monkeypatch.setattr(safeckpt.api, "open", lambda path, **kw: Counting(real_open(path, **kw)))
    for argv in (["inspect", "n1.sckpt"], ["inspect", "--json", "n1.sckpt"], ["verify", "n1.sckpt"],
                 ["diff", "n1.sckpt", "n2.sckpt"], ["convert", "-q", "n1.sckpt", "n3.sckpt"],
                 ["inspect", "step-2.sckpt"], ["inspect", "--json", "step-2.sckpt"],
                 ["verify", "step-2.sckpt"], ["consolidate", "step-2.sckpt", "n4.sckpt"]):
        calls.clear()
        code = cli.main([argv[0], *(str(files / a) if a.endswith(".sckpt") else a
                                    for a in argv[1:])])
        assert code in (cli.EXIT_OK, cli.EXIT_DIFFERENT), argv
        assert calls[("keys",)] <= 2, argv
        assert max((count for key, count in calls.items() if len(key) > 1), default=0) <= 2, argv


# -- references: a checkpoint whose tensors are partly in other files (FORMAT.md section 11) -------

BASE = np.arange(1000, dtype=np.float32)  # 4000 bytes, unchanged from step 1 to step 2


def _save_linked(directory, tensors=None):
    """step-1.sckpt (a save id, checksums) and step-2.sckpt, which stores only its new 'lora' and
    refers to step 1 for 'base' (the bytes are equal: [X7])."""
    from safeckpt import format as fmt, writer
    step1 = {"base": BASE, "lora": np.zeros(8, np.float32), **(tensors or {})}
    safeckpt.api.save_plan(writer.Plan(step1, None, 64, True, save_id=fmt.new_save_id()),
                           str(directory / "step-1.sckpt"))
    with safeckpt.open(directory / "step-1.sckpt") as prev:
        where = {name: prev.location(name) for name in step1 if name != "lora"}
    step2 = {**step1, "lora": np.ones(8, np.float32)}
    safeckpt.api.save_plan(writer.Plan(step2, None, 64, True, refs=where,
                                       save_id=fmt.new_save_id()), str(directory / "step-2.sckpt"))
    return step2


def _save_id(path):
    with safeckpt.open(path) as reader:
        return reader.save_id.hex()


def test_inspect_shows_what_a_checkpoint_refers_to_and_the_file_of_each_tensor(files, call):
    _save_linked(files)
    r = call("inspect", "step-2.sckpt")
    assert r.returncode == cli.EXIT_OK, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1] == f"save id: {_save_id(files / 'step-2.sckpt')}"
    assert lines[2].split() == ["name", "dtype", "shape", "bytes", "offset", "file"]
    assert lines[4].split()[::5] == ["lora", "step-2.sckpt"]  # its own tensors, then references
    assert lines[5].split()[0] == "base" and lines[5].split()[-1] == "step-1.sckpt"
    assert "refers to 1 other file for 1 tensor (3.9 KiB); 'safeckpt consolidate' copies them " \
        "in:\n  step-1.sckpt: 1 tensor, 4000 bytes\n" in r.stdout
    r = call("inspect", "step-1.sckpt")  # a file without references: no column, no list
    assert "file" not in r.stdout.splitlines()[2] and "refers to" not in r.stdout

    desc = json.loads(call("inspect", "--json", "step-2.sckpt").stdout)
    assert desc["version"] == "1.4" and desc["save_id"] == _save_id(files / "step-2.sckpt")
    assert [(t["name"], t["file"]) for t in desc["tensors"]] == [("lora", "step-2.sckpt"),
                                                                 ("base", "step-1.sckpt")]
    with safeckpt.open(files / "step-1.sckpt") as step1:
        assert desc["tensors"][1]["offset"] == step1.info("base").offset  # in the file holding it
        assert desc["references"] == [{"file": "step-1.sckpt", "tensors": 1, "nbytes": 4000,
                                       "save_id": step1.save_id.hex(),
                                       "header_crc": step1.header_crc, "size": step1.size}]
    desc = json.loads(call("inspect", "--json", "a.sckpt").stdout)
    assert desc["references"] == [] and desc["save_id"] is None
    assert desc["tensors"][0]["file"] == "a.sckpt"


def test_verify_checks_every_reference_and_says_which_bytes_of_which_file(files, call):
    _save_linked(files)
    r = call("verify", "step-2.sckpt", "a.sckpt")
    assert r.returncode == cli.EXIT_OK, r.stderr
    assert r.stdout.splitlines() == [
        "step-2.sckpt: OK, 2 tensors, every structural check and checksum passed; bytes checked "
        "in each file:",
        "  step-2.sckpt: 1 tensor, 32 bytes (its own)",
        "  step-1.sckpt: 1 tensor, 4000 bytes (referred to: its save id, size, header CRC and "
        "entries match)",
        "a.sckpt: OK, 1 tensor, every structural check and checksum passed"]


def _flip_base(directory):
    """Flip one bit of 'base' in step-1.sckpt (its table, and so its header CRC, unchanged)."""
    with safeckpt.open(directory / "step-1.sckpt") as step1:
        offset = step1.info("base").offset
    data = bytearray((directory / "step-1.sckpt").read_bytes())
    data[offset + 5] ^= 1
    (directory / "step-1.sckpt").write_bytes(bytes(data))


@pytest.mark.parametrize("damage, code, words", [
    ("missing", cli.EXIT_NOT_FOUND, ["step-1.sckpt: No such file", "'step-2.sckpt' refers to",
                                     "[X5]"]),
    ("saved again", cli.EXIT_BAD_FILE, ["refers to", "step-1.sckpt", "not the file the "
                                        "checkpoint was saved against", "[X5]"]),
    ("a directory", cli.EXIT_OS_ERROR, ["step-1.sckpt: Is a directory", "[X5]"]),
    ("bit flipped", cli.EXIT_CHECKSUM, ["step-1.sckpt", "'base'", "checksum mismatch"]),
])
def test_a_broken_reference_fails_verify_inspect_and_convert_with_its_exit_code(
        files, call, damage, code, words):
    _save_linked(files)
    path = files / "step-1.sckpt"
    if damage == "missing":
        path.unlink()
    elif damage == "saved again":  # the same tensors, bytes and size: another save id [X5]
        from safeckpt import format as fmt, writer
        with safeckpt.open(path) as reader:
            same = reader.load_all(verify=True)
        safeckpt.api.save_plan(writer.Plan(same, None, 64, True, save_id=fmt.new_save_id()),
                               str(path))
    elif damage == "a directory":
        path.unlink()
        path.mkdir()
    else:
        _flip_base(files)
    commands = [("verify", "step-2.sckpt"), ("convert", "step-2.sckpt", "out.sckpt"),
                ("consolidate", "step-2.sckpt", "out.sckpt")]
    if damage != "bit flipped":  # opening checks [X5]; only reading the bytes finds a flip [X6]
        commands.append(("inspect", "step-2.sckpt"))
    for args in commands:
        r = call(*args)
        assert r.returncode == code, (args, r.stdout, r.stderr)
        assert all(word in r.stderr for word in words), (args, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and ": OK" not in r.stdout
        assert not (files / "out.sckpt").exists()


def test_convert_writes_a_self_contained_copy_that_outlives_the_files_referred_to(files, call):
    tensors = _save_linked(files)
    for out in ("full.sckpt", "full.safetensors"):
        r = call("convert", "step-2.sckpt", out)
        assert r.returncode == cli.EXIT_OK and ": 2 tensors, " in r.stdout, r.stderr
    (files / "step-1.sckpt").unlink()
    assert call("verify", "step-2.sckpt").returncode == cli.EXIT_NOT_FOUND
    for out in ("full.sckpt", "full.safetensors"):
        assert "refers to" not in call("inspect", out).stdout
        back = safeckpt.load_file(files / out)
        assert back.keys() == tensors.keys()
        assert all(np.array_equal(back[k], v) for k, v in tensors.items())
    assert call("verify", "full.sckpt").returncode == cli.EXIT_OK


def test_convert_of_a_file_with_checksums_refuses_corrupt_bytes_instead_of_new_checksums(files,
                                                                                         call):
    data = bytearray((files / "b.sckpt").read_bytes())
    data[-1] ^= 1  # a byte of 'extra': before, convert wrote it with a new, matching CRC32C
    (files / "bad.sckpt").write_bytes(bytes(data))
    for out in ("o.sckpt", "o.safetensors"):
        r = call("convert", "bad.sckpt", out)
        assert r.returncode == cli.EXIT_CHECKSUM and "'extra'" in r.stderr, r.stderr
        assert not (files / out).exists()
    r = call("diff", "bad.sckpt", "b.sckpt")  # diff still shows what differs
    assert r.returncode == cli.EXIT_DIFFERENT and "~ extra: max abs diff" in r.stdout


def test_consolidate_copies_in_what_a_checkpoint_refers_to_in_place_or_to_a_copy(files, call):
    tensors = _save_linked(files)
    r = call("consolidate", "step-2.sckpt", "copy.sckpt")
    assert r.returncode == cli.EXIT_OK, r.stderr
    assert r.stdout == ("step-2.sckpt -> copy.sckpt: self-contained, 1 tensor (4000 bytes) copied "
                        "in from step-1.sckpt\n")
    assert "refers to" in call("inspect", "step-2.sckpt").stdout  # the source is left as it is
    old_id = _save_id(files / "step-2.sckpt")
    r = call("consolidate", "step-2.sckpt")
    assert r.returncode == cli.EXIT_OK, r.stderr
    assert r.stdout == "step-2.sckpt: self-contained, 1 tensor (4000 bytes) copied in from " \
        "step-1.sckpt\n"
    assert _save_id(files / "step-2.sckpt") != old_id  # a new save: later ones may refer to it
    (files / "step-1.sckpt").unlink()  # nothing needs it now
    for name in ("step-2.sckpt", "copy.sckpt"):
        assert call("verify", name).stdout.count("\n") == 1
        back = safeckpt.load_file(files / name)
        assert all(np.array_equal(back[k], v) for k, v in tensors.items())
    before = (files / "a.sckpt").stat()
    r = call("consolidate", "a.sckpt")  # nothing to copy in: the file is not rewritten
    assert r.returncode == cli.EXIT_OK and "self-contained already" in r.stdout
    assert (files / "a.sckpt").stat().st_mtime_ns == before.st_mtime_ns


@pytest.mark.parametrize("args", [("consolidate", "step-2.sckpt"),
                                  ("consolidate", "step-2.sckpt", "step-1.sckpt"),
                                  ("convert", "a.sckpt", "step-1.sckpt"),
                                  ("convert", "step-3.sckpt", "step-2.sckpt")])
def test_a_file_that_a_checkpoint_refers_to_is_never_replaced(files, call, args):
    from safeckpt import format as fmt, writer
    tensors = _save_linked(files)
    with safeckpt.open(files / "step-2.sckpt") as step2:  # step 3 refers to both [X7]
        where = {name: step2.location(name) for name in tensors}
    safeckpt.api.save_plan(writer.Plan(tensors, None, 64, True, refs=where,
                                       save_id=fmt.new_save_id()), str(files / "step-3.sckpt"))
    target = args[-1] if args[-1] != "step-2.sckpt" or args[0] == "convert" else "step-2.sckpt"
    referring = "step-3.sckpt" if target == "step-2.sckpt" else "step-2.sckpt, step-3.sckpt"
    before = {name: (files / name).read_bytes() for name in ("step-1.sckpt", "step-2.sckpt")}
    r = call(*args)
    assert r.returncode == cli.EXIT_USAGE, (r.stdout, r.stderr)
    assert r.stderr.startswith(f"safeckpt: error: {target}: {referring} refer")
    assert "replacing it would break" in r.stderr and "[X8]" in r.stderr
    assert {name: (files / name).read_bytes() for name in before} == before
    assert call("verify", "step-2.sckpt", "step-3.sckpt").returncode == cli.EXIT_OK


def test_the_refusal_to_replace_a_file_names_the_way_out(files, call):
    _save_linked(files)
    r = call("convert", "a.sckpt", "step-1.sckpt")
    assert r.stderr == ("safeckpt: error: step-1.sckpt: step-2.sckpt refers to it, and replacing "
                        "it would break that checkpoint [X8]; write to another path, or "
                        "consolidate or delete it first\n")


def test_inspect_shows_jax_keys_and_weak_values(files, call):
    """[R9] [R10]: a typed PRNG key and weakly typed values are shown in the outline and in
    --json, not taken for scalars (an internal error before)."""
    jax = pytest.importorskip("jax")
    safeckpt.save({"rng": jax.random.key(0), "lr": jax.numpy.asarray(0.5),
                   "w": np.ones(2, np.float32)}, files / "jax.sckpt")
    r = call("inspect", "jax.sckpt")
    assert r.returncode == cli.EXIT_OK, r.stderr
    assert "'rng': PRNG key (threefry2x32) of tensor rng uint32 [2]" in r.stdout
    assert "'lr': weak tensor lr float32 []" in r.stdout
    r = call("inspect", "--json", "jax.sckpt")
    assert r.returncode == cli.EXIT_OK, r.stderr
    items = dict(json.loads(r.stdout)["tree"]["items"])
    assert items["rng"] == {"key": "threefry2x32", "data": {"tensor": "rng"}}
    assert items["lr"] == {"weak": {"tensor": "lr"}}
