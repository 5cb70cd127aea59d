"""The one table of error messages and the one function that turns codes into exceptions."""

import errno

import pytest

import safeckpt
from safeckpt.errors import ERRORS, TRUNCATED_HINT, Code, error_for


def test_every_error_code_has_one_class_and_message():
    assert set(ERRORS) == set(Code) - {Code.OK}
    for code, (cls, message) in ERRORS.items():
        assert issubclass(cls, (safeckpt.SafeckptError, OSError, MemoryError)), code
        assert message and message == message.strip(), code


@pytest.mark.parametrize("code", sorted(set(Code) - {Code.OK}))
def test_error_for_names_where_then_the_table_message_then_the_detail(code):
    cls, message = ERRORS[code]
    exc = error_for(code, "m.sckpt, tensor 'w'", " (stored 0x1)")
    assert type(exc) is cls
    assert str(exc) == f"m.sckpt, tensor 'w': {message} (stored 0x1)"
    assert type(error_for(int(code), "x")) is cls  # the plain int a backend returns


def test_error_for_io_with_an_errno_is_that_os_error():
    exc = error_for(Code.IO, "reading bytes [0, 8)", errno=errno.EISDIR)
    assert type(exc) is IsADirectoryError and exc.errno == errno.EISDIR
    assert "reading bytes [0, 8)" in str(exc) and "directory" in str(exc).lower()


@pytest.mark.parametrize("code", [Code.OK, 0, 1, -1000])
def test_error_for_refuses_what_is_not_an_error_code(code):
    with pytest.raises(ValueError):
        error_for(code, "x")


def test_every_truncation_message_reads_the_same():
    """[P1, P6] and [T7]: one hint, whichever rule found the end of the file."""
    for code in (Code.TRUNCATED, Code.TENSOR_TRUNCATED):
        cls, message = ERRORS[code]
        assert cls is safeckpt.TruncatedFileError and f"({TRUNCATED_HINT})" in message
