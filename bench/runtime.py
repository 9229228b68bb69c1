"""Benchmark: backend selection and the agent's inference overhead on real models.

The same as `tether bench runtime` (see `tether.devtools.bench_runtime` for what is
measured): for an MLP, a small CNN and EfficientNet-Lite0 (`bench/models/`),
the latency of every candidate (engine x backend x threads x precision), the
candidate backend selection chose within its budget and `chosen_over_best`,
`selection_seconds`, and `agent_over_raw` (the agent's worker calling
ctx.model.run vs the engine called directly, same input, same process kind).

    python bench/runtime.py --out runtime-bench.json
"""

from __future__ import annotations

import sys

from tether.devtools.bench_runtime import runtime

if __name__ == "__main__":
    runtime.main(args=sys.argv[1:], prog_name="bench/runtime.py")
