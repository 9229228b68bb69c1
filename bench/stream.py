"""Benchmark: on-device event-pattern matching, trie vs naive per-pattern scan, in the same run.

Same as `tether bench stream` (the implementation lives in `tether.devtools.bench_stream`):

    python bench/stream.py --events 50000 --patterns 1,100,1000 --out bench-stream.json
"""

from __future__ import annotations

from tether.devtools.bench_stream import stream

if __name__ == "__main__":
    stream()
