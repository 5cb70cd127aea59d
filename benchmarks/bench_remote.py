"""Remote reads (issue 14): requests, bytes and time to load one tensor and to load everything of
GPT-2 small over HTTP and S3, against downloading the whole file then loading it, and against
safetensors' own loading through fsspec (which reads the whole file).

    python benchmarks/bench_remote.py               # GPT-2 small (498 MB), 5 runs each
    python benchmarks/bench_remote.py --blocks 2 --runs 3    # a quick check (~180 MB)

One process. The model (benchmarks/cases.py's GPT-2 small shapes, float32, numpy only) is saved
as .sckpt (with CRC32Cs) and as .safetensors (by the safetensors package), and both files are
served by tests/servers.py's servers on 127.0.0.1: the counting HTTP/1.1 server (fsspec's http,
aiohttp) and moto's S3 server behind a counting WSGI middleware (s3fs). Requests and response body
bytes are the servers' own counts (HEAD, GET; one run, they do not vary), time is the median of
``--runs`` runs after one untimed warm-up round, the cases in a rotated order each run. Ratios
are to "download the whole file, then load it" of the same file and server.

Cases, for each server:
- safeckpt, open + one tensor: ``safeckpt.open(url)[name]`` (a 7 MB attention weight).
- safeckpt, load all: ``safeckpt.load_file(url)``.
- download, then safeckpt: ``safeckpt.load_bytes(fs.cat_file(url))`` (the whole file in one GET,
  then arrays that view those bytes: the cheapest download-then-load there is).
- the same three on the .safetensors file (safeckpt reads it lazily too).
- safetensors: ``safetensors.numpy.load(fs.cat_file(url))``; safetensors has no ranged reader of
  its own (its safe_open takes a local path), so this is how it loads through fsspec.

moto answers a ranged GET by reading the whole object from its store, so its times are moto's more
than the client's; its request and byte counts are those S3 would see.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # tests/servers.py
sys.path.insert(0, HERE)

import cases  # noqa: E402
import servers  # noqa: E402

import safeckpt  # noqa: E402

ONE = "h.0.attn.c_attn.weight"  # (768, 2304) float32: 7.1 MB


def model(blocks):
    """GPT-2 small's tensors (``blocks`` of its 12 transformer blocks), random float32."""
    shapes = {name: shape for name, shape in cases.gpt2_shapes().items()
              if not name.startswith("h.") or int(name.split(".")[1]) < blocks}
    return cases.make_tensors(shapes)


def check(got, want):
    """The loaded tensors are the saved ones (a benchmark of wrong answers measures nothing)."""
    if sorted(got) != sorted(want) or not all(np.array_equal(got[k], want[k]) for k in want):
        raise AssertionError("a case loaded other tensors than those saved")


def make_cases(fs, sckpt_url, st_url, options):
    """``{label: (fn, kind, file)}``: each fn loads and returns what it loaded."""
    import safetensors.numpy

    def one(url):
        with safeckpt.open(url, storage_options=options) as f:
            return {ONE: f[ONE]}

    return {
        "safeckpt: open + one tensor": (lambda: one(sckpt_url), "one", "sckpt"),
        "safeckpt: load all": (
            lambda: safeckpt.load_file(sckpt_url, storage_options=options), "all", "sckpt"),
        "download, then safeckpt.load_bytes": (
            lambda: safeckpt.load_bytes(fs.cat_file(sckpt_url)), "download", "sckpt"),
        "safeckpt on .safetensors: open + one tensor": (lambda: one(st_url), "one", "st"),
        "safeckpt on .safetensors: load all": (
            lambda: safeckpt.load_file(st_url, storage_options=options), "all", "st"),
        "download, then safetensors.numpy.load": (
            lambda: safetensors.numpy.load(fs.cat_file(st_url)), "download", "st"),
    }


def measure(label, fn, traffic, want, runs_times):
    """One run of a case: its time appended to ``runs_times[label]``; (requests, bytes)."""
    traffic.reset()
    start = time.perf_counter()
    got = fn()
    runs_times.setdefault(label, []).append(time.perf_counter() - start)
    counts = traffic.requests, traffic.bytes, dict(traffic.by_method)
    check(got, {k: want[k] for k in got} if len(got) == 1 else want)
    return counts


def bench(server_name, fs, urls, options, traffic, tensors, runs):
    """Run every case of one server ``runs`` times (plus a warm-up); the table's rows."""
    table = make_cases(fs, *urls, options)
    labels = list(table)
    counts, times = {}, {}
    for run in range(runs + 1):
        order = labels[run % len(labels):] + labels[:run % len(labels)]
        for label in order:
            fn, _, _ = table[label]
            counts[label] = measure(label, fn, traffic, tensors, times)
        if run == 0:
            times.clear()  # the warm-up round
    rows = []
    for label in labels:
        _, kind, file = table[label]
        base = next(other for other in labels
                    if table[other][1] == "download" and table[other][2] == file)
        median = statistics.median(times[label])
        rows.append((server_name, label, counts[label], median,
                     median / statistics.median(times[base]), counts[label][1] / counts[base][1]))
    return rows


def serve_http(blobs):
    """The counting HTTP server with the files; (server, fs, urls, options)."""
    import fsspec

    server = servers.ObjectServer().start()
    server.objects.update(blobs)
    options = servers.http_options(600)
    fs = fsspec.filesystem("http", **options)
    return server, fs, [server.url(name) for name in blobs], options


def serve_s3(blobs):
    """moto's server with the files in a bucket; (server, fs, urls, options)."""
    os.environ.update(servers.AWS_ENV)
    server = servers.MotoServer().start()
    bucket = servers.S3Bucket(server, read_timeout=600)
    urls = []
    for name, data in blobs.items():
        bucket.fs.pipe_file(bucket.url(name), data)
        urls.append(bucket.url(name))
    return server, bucket.fs, urls, bucket.storage_options


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--blocks", type=int, default=12, help="GPT-2 blocks (12: all)")
    parser.add_argument("--servers", default="http,s3")
    args = parser.parse_args()
    import safetensors.numpy

    tensors = model(args.blocks)
    blobs = {"gpt2.sckpt": safeckpt.save_bytes(tensors),
             "gpt2.safetensors": safetensors.numpy.save(tensors)}
    size = {name: len(data) for name, data in blobs.items()}
    print(f"GPT-2 small ({args.blocks} blocks): {len(tensors)} tensors, "
          f"{sum(t.nbytes for t in tensors.values()) / 1e6:.1f} MB of float32; .sckpt "
          f"{size['gpt2.sckpt'] / 1e6:.1f} MB, .safetensors {size['gpt2.safetensors'] / 1e6:.1f} "
          f"MB; one tensor: {ONE} {tensors[ONE].nbytes / 1e6:.1f} MB; backend "
          f"{safeckpt.backend}; medians of {args.runs} runs\n")
    rows = []
    with servers.LoopbackOnly() as guard:
        for name in args.servers.split(","):
            server, fs, urls, options = (serve_http if name == "http" else serve_s3)(blobs)
            try:
                rows += bench(name, fs, urls, options, server.traffic, tensors, args.runs)
            finally:
                server.stop()
    if guard.outbound:
        raise SystemExit(f"the benchmark reached beyond 127.0.0.1: {guard.outbound}")
    print("| server | case | requests | MB transferred | time | x time of download+load "
          "| x bytes of download |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for server_name, label, (requests, nbytes, by_method), median, t_ratio, b_ratio in rows:
        methods = " + ".join(f"{n} {m}" for m, n in sorted(by_method.items()))
        print(f"| {server_name} | {label} | {requests} ({methods}) | {nbytes / 1e6:.2f} | "
              f"{median * 1e3:.0f} ms | {t_ratio:.3f} | {b_ratio:.4f} |")


if __name__ == "__main__":
    main()
