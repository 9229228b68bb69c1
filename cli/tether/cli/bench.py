"""`tether bench`: benchmarks that write machine-readable results (one module per benchmark).

Subcommands load lazily, like the top-level CLI, so a benchmark's
dependencies are imported only when it runs. Add one by naming its click
command in `BENCHMARKS`.
"""

from __future__ import annotations

import importlib

import click

# name -> ("module:attribute" of a click command, one-line help)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "fl": (
        "tether.devtools.bench_fl:fl",
        "Federated digits: FedAvg side by side with Flower, best strategy, aggregation at scale, poisoning.",
    ),
    "fleet": (
        "tether.devtools.bench_fleet:fleet",
        "Simulated fleet vs one controller: connections, notify/install times, bytes, polling baseline.",
    ),
    "runtime": (
        "tether.devtools.bench_runtime:runtime",
        "Backend selection and agent inference overhead on real models (bench/models or any model folder).",
    ),
    "tunnel": (
        "tether.devtools.bench_tunnel:tunnel",
        "Real-time tunnel: 30 KB emits from N connected agents to a consumer, p50/p99 vs direct Redis XADD.",
    ),
    "soak": (
        "tether.devtools.bench_soak:soak",
        "Simulated fleet under churn (and controller kills) through a staged rollout and a rollback: lost reports, "
        "errors, controller memory.",
    ),
    "stream": (
        "tether.devtools.bench_stream:stream",
        "On-device event-pattern matching: events/s with 1, 100, 1000 patterns, trie vs naive per-pattern scan.",
    ),
}


class _LazyBench(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(BENCHMARKS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in BENCHMARKS:
            return None
        module_name, attr = BENCHMARKS[cmd_name][0].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise click.ClickException(
                f"`tether bench {cmd_name}` needs {e.name!r}, which is not installed here"
            ) from e
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Benchmarks"):
            formatter.write_dl([(name, BENCHMARKS[name][1]) for name in sorted(BENCHMARKS)])


@click.group(cls=_LazyBench)
def bench() -> None:
    """Run a benchmark; each measures its baseline in the same run and writes JSON."""
