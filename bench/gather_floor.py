"""The CPU floor of a KV gather: how long does merely *reading* the kept rows take?

    python bench/gather_floor.py [--json PATH]

compact_kv's "% copy" compares it with a contiguous copy of the same bytes. A gather reads
scattered rows (D = 128 bf16: 256 bytes each) instead of one stream; this script measures
what that access pattern costs on this machine, with no write at all, by a tiny C++ probe
built on the fly (torch.utils.cpp_extension, about a minute the first time):

- ``read kept``: every kept row of every layer's K and V, in the kernel's order (per tensor,
  batch row and KV head; rows ascending), software prefetch 8 rows ahead as the kernel does;
- ``read contiguous``: the same number of rows per (tensor, row, head), but the first ones;
- ``copy``: the benchmark's copy ceiling (the same bytes read and written, one stream);
- ``native_into``: compact_kv_into (the native kernel writing caches allocated once).

All are timed as in bench/run.py (caches evicted before each call, 2 threads here). CPU only.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from registry import Case, make_inputs  # noqa: E402
from timing import machine_info, time_ms  # noqa: E402

import glimpse_ops as g  # noqa: E402
from glimpse_ops import reference as ref  # noqa: E402

PROBE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>

// Reads rows of every (tensor, b, head) block: the kept ones (index >= 0) or, when
// contiguous, as many rows from the start of the block. Returns a checksum so that the
// reads are not optimized away.
int64_t read_rows(std::vector<at::Tensor> sources, at::Tensor index, bool contiguous) {
  const int64_t n = sources.size(), batch = sources[0].size(0), heads = sources[0].size(1);
  const int64_t out_len = index.size(1);
  const int64_t* idx = index.data_ptr<int64_t>();
  std::atomic<uint64_t> total{0};
  at::parallel_for(0, n * batch * heads, 1, [&](int64_t begin, int64_t end) {
    uint64_t acc = 0;
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = w / (batch * heads), b = (w / heads) % batch, h = w % heads;
      const at::Tensor& src = sources[t];
      const int64_t elem = src.element_size(), row_bytes = src.size(3) * elem;
      const char* base = static_cast<const char*>(src.const_data_ptr()) +
                         (b * src.stride(0) + h * src.stride(1)) * elem;
      const int64_t stride = src.stride(2) * elem;
      const int64_t* rows = idx + b * out_len;
      int64_t next = 0;
      for (int64_t i = 0; i < out_len; ++i) {
        if (rows[i] < 0) continue;
        const int64_t row = contiguous ? next++ : rows[i];
        if (i + 8 < out_len && rows[i + 8] >= 0) {
          const char* ahead = base + (contiguous ? next + 7 : rows[i + 8]) * stride;
          for (int64_t line = 0; line < row_bytes; line += 64) __builtin_prefetch(ahead + line);
        }
        const uint64_t* p = reinterpret_cast<const uint64_t*>(base + row * stride);
        for (int64_t k = 0; k < row_bytes / 8; ++k) acc ^= p[k];
      }
    }
    total ^= acc;
  });
  return static_cast<int64_t>(total.load());
}
"""

CASES = ((4096, 1, 0.074), (16384, 1, 0.074), (4096, 8, 0.074), (16384, 1, 0.50))


def build_probe():
    from torch.utils.cpp_extension import load_inline

    build = Path(tempfile.gettempdir()) / "glimpse_gather_floor"
    build.mkdir(exist_ok=True)
    return load_inline(
        "glimpse_gather_floor",
        cpp_sources=PROBE,
        functions=["read_rows"],
        extra_cflags=["-O3", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        build_directory=str(build),
    )


def measure_case(probe, visual: int, batch: int, keep: float, budget_s: float) -> dict:
    case = Case("compact_kv", visual, keep, batch)
    x = make_inputs(case, "cpu")
    kept = ref.select_tokens_reference(x["scores"], x["candidates"], None, case.max_keep, 0)
    index = ref.keep_index_reference(kept, case.max_len, "left")[0]
    sources = x["keys"] + x["values"]
    outputs = [t.new_empty(t.shape[0], t.shape[1], index.shape[1], t.shape[3]) for t in sources]
    src = torch.empty(case.moved_bytes() // 2, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src).fill_(2)
    n = len(x["keys"])
    calls = {
        "read kept": lambda: probe.read_rows(sources, index, False),
        "read contiguous": lambda: probe.read_rows(sources, index, True),
        "copy": lambda: dst.copy_(src),
        "native_into": lambda: g.compact_kv_into(x["keys"], x["values"], index, outputs[:n], outputs[n:]),
    }
    row = {"case": case.name(), "kept_bytes": case.moved_bytes() // 2}
    for name, call in calls.items():
        row[name] = round(time_ms(call, "cpu", budget_s, cold=True)["p50"], 3)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per row")
    args = parser.parse_args(argv)
    probe = build_probe()
    rows = []
    print(f"{'case':<36} {'read kept':>10} {'read contig':>12} {'copy':>8} {'native_into':>12}  (ms, p50, cold)")
    for visual, batch, keep in CASES:
        row = measure_case(probe, visual, batch, keep, args.budget)
        rows.append(row)
        print(
            f"{row['case']:<36} {row['read kept']:>10.2f} {row['read contiguous']:>12.2f} {row['copy']:>8.2f} "
            f"{row['native_into']:>12.2f}",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine_info("cpu"), "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
