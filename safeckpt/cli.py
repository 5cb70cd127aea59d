"""The ``safeckpt`` command: ``inspect``, ``verify``, ``convert`` and ``diff``.

Exit codes (stable; scripts may test them):

====  ==============================================================================
0     success; ``diff``: the files hold the same tensors, bit for bit, and metadata
1     ``diff``: the files differ
2     usage: a bad option or argument, an unknown output extension
3     bad file: not a checkpoint, malformed, truncated, over a limit, needs pickle
4     checksum mismatch: a tensor's or the header's CRC32C (``verify``)
5     not found: a file or a shard that does not exist
6     other OS error: permission denied, a directory, a full disk
7     a needed optional package is missing (torch, to read a .pt file)
====  ==============================================================================

Problems are reported on stderr as one line, ``safeckpt: error: ...``, without a traceback.

Example:
    $ safeckpt inspect model.sckpt --json | jq '.tensors[0]'
    $ safeckpt verify *.sckpt && echo intact
    $ safeckpt convert model.safetensors model.sckpt
    $ safeckpt diff before.sckpt after.sckpt
"""

import argparse
import json
import math
import sys

import numpy as np

from . import __version__
from . import interop as _convert
from . import format as fmt
from . import tree as _tree
from .errors import ChecksumError, SafeckptError

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_USAGE = 2
EXIT_BAD_FILE = 3
EXIT_CHECKSUM = 4
EXIT_NOT_FOUND = 5
EXIT_OS_ERROR = 6
EXIT_MISSING_PACKAGE = 7

PROGRESS_MIN_BYTES = 64 << 20  # below this a conversion takes well under a second: no bar
DIFF_CHUNK = 1 << 20  # elements compared at a time, so diff needs no copy of a whole tensor
OUTLINE_MAX_LINES = 200


class _Usage(Exception):
    """A usage problem found after argument parsing (exit code 2)."""


def _exit_code(exc):
    """The exit code for an exception that ends a command."""
    if isinstance(exc, ChecksumError):
        return EXIT_CHECKSUM
    if isinstance(exc, SafeckptError):
        return EXIT_BAD_FILE
    if isinstance(exc, FileNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(exc, OSError):
        return EXIT_OS_ERROR
    if isinstance(exc, ImportError):
        return EXIT_MISSING_PACKAGE
    if isinstance(exc, (_Usage, ValueError)):  # ValueError not from a file: a bad argument
        return EXIT_USAGE
    return None


def _message(exc):
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return str(exc)


# -- inspect ----------------------------------------------------------------------------------------

def _human(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _jsonable(value):
    """Metadata and tree values as JSON: bytes as {"base64": ...}, non-finite floats as str."""
    import base64
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _outline(reader):
    """The tree as indented lines (containers with their lengths; leaves with type or value)."""
    skeleton = getattr(reader, "_skeleton", fmt.NO_TREE)
    if skeleton is fmt.NO_TREE:
        return None
    infos = {}
    names = reader.keys()
    lines = []
    stack = [(skeleton, None, 0)]
    while stack and len(lines) < OUTLINE_MAX_LINES:
        node, key, depth = stack.pop()
        label = "" if key is None else f"{key!r}: "
        pad = "  " * depth
        if type(node) is list and node[0] in _tree.CONTAINERS:
            tag, items = node[0], node[1:]
            if tag in (_tree.DICT, _tree.ODICT):
                lines.append(f"{pad}{label}{tag} ({len(items) // 2})")
                children = [(items[i + 1], items[i], depth + 1) for i in range(0, len(items), 2)]
            else:
                lines.append(f"{pad}{label}{tag} ({len(items)})")
                children = [(child, i, depth + 1) for i, child in enumerate(items)]
            stack.extend(reversed(children))
        elif type(node) is list and node[0] in (_tree.TENSOR, _tree.REF):
            name = names[node[1]]
            if name not in infos:
                infos[name] = reader.info(name)
            info = infos[name]
            kind = "tensor" if node[0] == _tree.TENSOR else "same tensor as"
            lines.append(f"{pad}{label}{kind} {name} {info.dtype} {list(info.shape)}")
        elif type(node) is list and node[0] == _tree.SCALAR:
            from .dtypes import DTYPE_BY_CODE
            value = np.frombuffer(node[2], DTYPE_BY_CODE[node[1]])[0]
            lines.append(f"{pad}{label}{value.dtype} scalar {value!r}")
        else:
            lines.append(f"{pad}{label}{node!r}")
    if stack:
        lines.append(f"... (outline cut at {OUTLINE_MAX_LINES} lines)")
    return lines


def _json_outline(node, names):
    """The tree as JSON: containers as {"type", "items"}; tensors as {"tensor": name}."""
    if type(node) is not list:
        return _jsonable(node)
    tag = node[0]
    if tag in (_tree.DICT, _tree.ODICT):
        pairs = node[1:]
        return {"type": tag, "items": [[_jsonable(pairs[i]), _json_outline(pairs[i + 1], names)]
                                       for i in range(0, len(pairs), 2)]}
    if tag in (_tree.LIST, _tree.TUPLE):
        return {"type": tag, "items": [_json_outline(child, names) for child in node[1:]]}
    if tag in (_tree.TENSOR, _tree.REF):
        return {"tensor": names[node[1]]}
    from .dtypes import DTYPE_BY_CODE
    value = np.frombuffer(node[2], DTYPE_BY_CODE[node[1]])[0]
    return {"scalar": str(value.dtype), "value": _jsonable(value.item())}


def _describe_file(reader, path):
    infos = [reader.info(name) for name in reader.keys()]
    version = getattr(reader, "version", None)
    return {
        "path": path,
        "format": getattr(reader, "format", "sckpt"),
        "version": f"{version[0]}.{version[1]}" if version else None,
        "file_size": getattr(reader, "size", None),
        "align": getattr(reader, "align", None),
        "checksums": reader.has_checksums,
        "tensor_count": len(infos),
        "tensor_bytes": sum(i.nbytes for i in infos),
        "tensors": [{"name": i.name, "dtype": str(i.dtype), "shape": list(i.shape),
                     "nbytes": i.nbytes, "offset": i.offset, "crc32c": i.crc32c} for i in infos],
        "metadata": _jsonable(reader.metadata),
    }


def cmd_inspect(args, out):
    from .reader import open as open_file
    with open_file(args.file, **_limits(args)) as reader:
        desc = _describe_file(reader, args.file)
        skeleton = getattr(reader, "_skeleton", fmt.NO_TREE)
        if args.json:
            desc["tree"] = None if skeleton is fmt.NO_TREE else _json_outline(skeleton, reader.keys())
            json.dump(desc, out, indent=2, allow_nan=False)
            out.write("\n")
            return EXIT_OK
        outline = _outline(reader)
    version = f" {desc['version']}" if desc["version"] else ""
    out.write(f"{args.file}: {desc['format']}{version}, {_human(desc['file_size'])}, "
              f"{desc['tensor_count']} tensors, {_human(desc['tensor_bytes'])} of tensor data, "
              f"{'checksums' if desc['checksums'] else 'no checksums'}\n")
    rows = [("name", "dtype", "shape", "bytes", "offset")]
    rows += [(t["name"], t["dtype"], "(" + ", ".join(map(str, t["shape"])) + ")", str(t["nbytes"]),
              str(t["offset"])) for t in desc["tensors"]]
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    for k, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1]), row[2].ljust(widths[2]),
                 row[3].rjust(widths[3]), row[4].rjust(widths[4])]
        out.write("  ".join(cells).rstrip() + "\n")
        if k == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    out.write(f"total: {desc['tensor_count']} tensors, {desc['tensor_bytes']} bytes\n")
    if desc["metadata"]:
        out.write("metadata:\n")
        for key, value in desc["metadata"].items():
            out.write(f"  {key}: {json.dumps(value, allow_nan=False)}\n")
    if outline is not None:
        out.write("tree:\n")
        out.writelines(f"  {line}\n" for line in outline)
    return EXIT_OK


# -- verify -----------------------------------------------------------------------------------------

def cmd_verify(args, out):
    from .reader import open as open_file
    first = None
    for path in args.files:
        try:
            with open_file(path, **_limits(args)) as reader:
                if reader.has_checksums:
                    reader.verify()
                    note = "every check and checksum passed"
                else:
                    why = ("safetensors files hold no checksums" if getattr(reader, "format", "")
                           == "safetensors" else "saved without checksums")
                    note = f"every structural check passed ({why})"
                out.write(f"{path}: OK, {len(reader)} tensors, {note}\n")
        except (SafeckptError, OSError) as exc:
            _error(exc)
            first = first if first is not None else _exit_code(exc)
    return first or EXIT_OK


# -- convert ----------------------------------------------------------------------------------------

def _progress_bar(enabled):
    """A ``progress(done, total)`` callback: tqdm when installed, else a plain line on stderr."""
    if not enabled:
        return None
    state = {}

    def progress(done, total):
        if "bar" not in state:
            if total < PROGRESS_MIN_BYTES and enabled != "always":
                state["bar"] = None
                return
            try:
                from tqdm import tqdm
                state["bar"] = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                    desc="convert", file=sys.stderr, leave=False)
            except ImportError:
                state["bar"] = _PlainBar(total)
            state["done"] = 0
        bar = state["bar"]
        if bar is not None:
            bar.update(done - state["done"])
            state["done"] = done
            if done >= total:
                bar.close()
    return progress


class _PlainBar:
    """The fallback when tqdm is not installed: ``convert  42% (1.0 GiB of 2.4 GiB)`` on stderr."""

    def __init__(self, total):
        self.total, self.done, self.shown = total, 0, -1

    def update(self, n):
        self.done += n
        percent = 100 * self.done // self.total if self.total else 100
        if percent != self.shown:
            self.shown = percent
            sys.stderr.write(f"\rconvert {percent:3d}% ({_human(self.done)} of {_human(self.total)})")
            sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")


def cmd_convert(args, out):
    if args.progress:
        enabled = "always"
    elif args.quiet:
        enabled = False
    else:
        enabled = sys.stderr.isatty()
    try:
        result = _convert.convert(args.src, args.dst, align=args.align,
                                  checksum=not args.no_checksum, progress=_progress_bar(enabled),
                                  **_limits(args))
    except ValueError as exc:
        if isinstance(exc, SafeckptError):
            raise
        raise _Usage(str(exc)) from None
    if not args.quiet:
        out.write(f"{args.src} -> {args.dst}: {result.tensors} tensors, {_human(result.nbytes)}\n")
    return EXIT_OK


# -- diff -------------------------------------------------------------------------------------------

def _max_abs_diff(a, b):
    """The largest |a - b| over the elements (float64 or an exact int), in chunks; NaN where one
    side is NaN and the other not (NaN in both places counts as equal)."""
    a, b = a.reshape(-1), b.reshape(-1)
    exact_int = a.dtype == b.dtype and a.dtype.kind in "iu"
    worst = 0
    for start in range(0, a.size, DIFF_CHUNK):
        x, y = a[start:start + DIFF_CHUNK], b[start:start + DIFF_CHUNK]
        if exact_int:  # max - min in the dtype itself: exact, no overflow
            d = int((np.maximum(x, y) - np.minimum(x, y)).max(initial=0))
        else:
            kind = np.complex128 if "c" in (x.dtype.kind, y.dtype.kind) else np.float64
            x, y = x.astype(kind), y.astype(kind)
            both_nan = np.isnan(x) & np.isnan(y)
            delta = np.abs(x - y)
            delta[both_nan] = 0
            if np.isnan(delta).any():
                return float("nan")
            d = float(delta.max(initial=0.0))
        worst = max(worst, d)
    return worst


def cmd_diff(args, out):
    with _convert.read_source(args.a, **_limits(args)) as a, \
            _convert.read_source(args.b, **_limits(args)) as b:
        lines = []
        ta, tb = a.tensors, b.tensors
        for name in ta:
            if name not in tb:
                lines.append(f"- {name}: only in {args.a} ({ta[name].dtype} {list(ta[name].shape)})")
        for name in tb:
            if name not in ta:
                lines.append(f"+ {name}: only in {args.b} ({tb[name].dtype} {list(tb[name].shape)})")
        same = 0
        for name in ta:
            if name not in tb:
                continue
            x, y = ta[name], tb[name]
            changes = []
            if x.dtype != y.dtype:
                changes.append(f"dtype {x.dtype} -> {y.dtype}")
            if tuple(x.shape) != tuple(y.shape):
                changes.append(f"shape {list(x.shape)} -> {list(y.shape)}")
            else:
                x, y = _load(x), _load(y)
                if x.dtype != y.dtype or not _same_bytes(x, y):
                    changes.append(f"max abs diff {_max_abs_diff(x, y):.6g}")
            if changes:
                lines.append(f"~ {name}: " + ", ".join(changes))
            else:
                same += 1
        meta = _metadata_changes(a.metadata, b.metadata)
        lines.extend(meta)
        if not _tree.same(_tree_of(a), _tree_of(b)):
            lines.append("~ the tree (structure and plain values) differs")
    out.writelines(line + "\n" for line in lines)
    out.write(f"{same} of {len(ta)} tensors in {args.a} identical; {len(lines)} differences\n")
    return EXIT_DIFFERENT if lines else EXIT_OK


def _load(array):
    from .writer import LazyArray
    return array.load() if isinstance(array, LazyArray) else array


def _same_bytes(x, y):
    """Whether two arrays of one dtype hold the same bits (NaN payloads and -0.0 included)."""
    x, y = x.reshape(-1), y.reshape(-1)
    return all(np.array_equal(x[i:i + DIFF_CHUNK].view(np.uint8), y[i:i + DIFF_CHUNK].view(np.uint8))
               for i in range(0, x.size, DIFF_CHUNK))


def _metadata_changes(ma, mb):
    lines = []
    for key in ma:
        if key not in mb:
            lines.append(f"- metadata[{key!r}] = {ma[key]!r}")
        elif not _tree.same(ma[key], mb[key]):
            lines.append(f"~ metadata[{key!r}]: {ma[key]!r} -> {mb[key]!r}")
    lines += [f"+ metadata[{key!r}] = {mb[key]!r}" for key in mb if key not in ma]
    return lines


def _tree_of(source):
    """The encoded tree (structure, plain values, tensor indices), or None for a flat file."""
    return source.tree if source.tree is not fmt.NO_TREE else None


# -- main -------------------------------------------------------------------------------------------

def _limits(args):
    return {"max_header_size": args.max_header_size} if args.max_header_size else {}


def _error(exc):
    sys.stderr.write(f"safeckpt: error: {_message(exc)}\n")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own exit code is 2 too; keep our one-line style
        self.print_usage(sys.stderr)
        sys.stderr.write(f"safeckpt: error: {message}\n")
        raise SystemExit(EXIT_USAGE)


def build_parser():
    parser = _Parser(prog="safeckpt", description="Inspect, verify, convert and compare "
                     "checkpoints (.sckpt, .safetensors, .npz, .npy, torch .pt/.bin).",
                     epilog="exit codes: 0 ok, 1 diff found differences, 2 usage, 3 bad file, "
                     "4 checksum mismatch, 5 not found, 6 other OS error, 7 missing package")
    parser.add_argument("--version", action="version", version=f"safeckpt {__version__}")
    parser.add_argument("--max-header-size", type=int, metavar="BYTES",
                        help="raise the header size limit (default 100 MiB) for files you trust")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="tensor table, totals, metadata and tree outline")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("verify", help="every structural check and checksum; exit 0 if all pass")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser("convert", help="convert by extension: .sckpt, .safetensors, "
                       "*.safetensors.index.json, .npz, .npy, .pt/.pth/.bin/.ckpt -> .sckpt or "
                       ".safetensors")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--align", type=int, default=fmt.ALIGN_DEFAULT, help="tensor alignment in "
                   f"a .sckpt output (default {fmt.ALIGN_DEFAULT})")
    p.add_argument("--no-checksum", action="store_true", help="no CRC32C in a .sckpt output")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--progress", action="store_true", help="always show a progress bar")
    shown.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no summary")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("diff", help="missing/extra tensors, dtype and shape changes, max abs "
                       "difference; exit 1 if the files differ")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(run=cmd_diff)
    return parser


def main(argv=None):
    """Run the command line; return the exit code (see the module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args, sys.stdout)
    except KeyboardInterrupt:
        sys.stderr.write("safeckpt: interrupted\n")
        return 130
    except BrokenPipeError:  # e.g. `safeckpt inspect big.sckpt | head`
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:
        code = _exit_code(exc)
        if code is None:
            raise  # a bug: keep the traceback
        _error(exc)
        return code


def console():
    """Entry point of the ``safeckpt`` console script."""
    sys.exit(main())
