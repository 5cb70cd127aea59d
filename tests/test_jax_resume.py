"""Issue 15's "done when": the flax.linen and flax.nnx example scripts, killed with SIGKILL and
resumed through CheckpointManager with no conversion code, print losses bit-identical to an
unbroken run's (the loss of every step as ``float.hex``). Each script runs in a subprocess (a
real SIGKILL), with this process's environment (XLA_FLAGS: four CPU devices, set by conftest).
Skipped where flax or optax is missing."""

import os
import re
import signal
import subprocess
import sys

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax", reason="flax is not installed: the example scripts need it")
pytest.importorskip("optax", reason="optax is not installed: the example scripts need it")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"linen": os.path.join(ROOT, "examples", "flax_linen_resume.py"),
           "nnx": os.path.join(ROOT, "examples", "flax_nnx_resume.py")}
STEPS = 12
SAVE_EVERY = 3  # saves after steps 2, 5, 8, 11
KILL_AT = 8  # SIGKILL right after step 8's save was requested
TIMEOUT = 300  # seconds per run: generous (two cores shared with other tests), never reached
LINE = re.compile(r"\Astep (\d+) loss (\S+)\Z")
RESUMED = re.compile(r"\Aresumed (\d+)\Z")


def run(script, directory, *extra):
    """Run ``script`` to STEPS in ``directory``; return (returncode, {step: loss hex}, resumed
    step or None, output)."""
    proc = subprocess.run(
        [sys.executable, SCRIPTS[script], "--dir", str(directory), "--steps", str(STEPS),
         "--save-every", str(SAVE_EVERY), *extra],
        cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=TIMEOUT)
    losses, resumed = {}, None
    for line in proc.stdout.splitlines():
        step, resume = LINE.match(line), RESUMED.match(line)
        if step:
            assert int(step.group(1)) not in losses, f"step {step.group(1)} printed twice"
            losses[int(step.group(1))] = step.group(2)
        elif resume:
            resumed = int(resume.group(1))
    return proc.returncode, losses, resumed, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    """Each script's losses from one run without a kill (computed once per script)."""
    cache = {}

    def get(script):
        if script not in cache:
            code, losses, resumed, out = run(script, tmp_path_factory.mktemp(f"{script}-unbroken"))
            assert code == 0, out
            assert resumed is None and sorted(losses) == list(range(STEPS)), out
            cache[script] = losses
        return cache[script]
    return get


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_sigkill_then_resume_is_bit_identical(script, async_save, unbroken, tmp_path):
    """A run killed right after step KILL_AT's save was requested (with ``async_save``, most
    likely while the background write is under way), then resumed, prints the same loss bits at
    every step as a run never stopped."""
    expected = unbroken(script)
    flags = ["--async-save"] if async_save else []

    code, before, resumed, out = run(script, tmp_path, "--kill-at", str(KILL_AT), *flags)
    assert code == -signal.SIGKILL, out
    assert resumed is None and sorted(before) == list(range(KILL_AT + 1)), out
    assert before == {step: expected[step] for step in before}, out

    code, after, resumed, out = run(script, tmp_path, *flags)
    assert code == 0, out
    # A synchronous save was complete before the kill; an async one may have been cut short,
    # and then the checkpoint before it is the newest whole one (atomic saves).
    assert resumed == KILL_AT or (async_save and resumed == KILL_AT - SAVE_EVERY), out
    assert sorted(after) == list(range(resumed + 1, STEPS)), out
    assert after == {step: expected[step] for step in after}, out
