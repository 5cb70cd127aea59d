"""setup.py's choices about the C core: optional at install, unless demanded.

Each test runs setup.py's build_ext in a copy of the build files with the compiler replaced by a
missing binary (CC=/nonexistent/cc): a machine without a compiler, in about a second. .ci/wheel
builds, repairs and installs the real wheel and sdist (with the compiler, and without it).
"""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
BUILD_FILES = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "csrc"]

pytestmark = pytest.mark.skipif(not (ROOT / "setup.py").is_file(),
                                reason="needs safeckpt's source tree (setup.py, csrc/)")
# setup.py needs what pyproject.toml's [build-system] requires; the test extra installs it
pytest.importorskip("setuptools", minversion="77")


@pytest.fixture
def tree(tmp_path):
    """A copy of the files setup.py reads, with an empty package: no build output in the checkout."""
    for name in BUILD_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, tmp_path / name)
        else:
            shutil.copy(source, tmp_path / name)
    (tmp_path / "safeckpt").mkdir()
    (tmp_path / "safeckpt" / "__init__.py").write_text("")
    return tmp_path


def build_ext(tree, **env):
    """Run ``setup.py build_ext`` in ``tree`` without a compiler; return (exit code, output)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SAFECKPT_")}
    environ.update(CC="/nonexistent/cc", **env)
    done = subprocess.run([sys.executable, "setup.py", "build_ext"], cwd=tree, env=environ,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_without_a_compiler_the_install_falls_back_to_pure_python_with_a_warning(tree):
    code, output = build_ext(tree)
    assert code == 0, output
    assert "the C core could not be built" in output and "/nonexistent/cc" in output
    assert "pure-Python backend" in output and "SAFECKPT_REQUIRE_EXT=1" in output  # the way out
    assert not list(tree.rglob("*.so"))


def test_without_a_compiler_a_demanded_c_core_fails_the_build(tree):
    code, output = build_ext(tree, SAFECKPT_REQUIRE_EXT="1")
    assert code != 0
    assert "/nonexistent/cc" in output and "could not be built" not in output


def test_no_ext_skips_the_compiler(tree):
    code, output = build_ext(tree, SAFECKPT_NO_EXT="1")
    assert code == 0, output
    assert "/nonexistent/cc" not in output and "could not be built" not in output


def test_no_ext_and_require_ext_together_are_refused(tree):
    code, output = build_ext(tree, SAFECKPT_NO_EXT="1", SAFECKPT_REQUIRE_EXT="1")
    assert code != 0 and "contradict" in output


def test_the_cffi_builder_refuses_to_build_without_its_sources(tmp_path):
    # run from a directory without csrc/: the builder must stop, not link a .so missing the core
    done = subprocess.run([sys.executable, str(ROOT / "csrc" / "build.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "FileNotFoundError" in done.stderr and "csrc/*.c" in done.stderr
    assert not list(tmp_path.iterdir())
