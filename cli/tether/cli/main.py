"""The `tether` command line: one module per command; this file only wires them.

Subcommands are imported only when they run, so a device that installed the
agent alone (no Kopf, Celery or psycopg) can still run `tether agent run`.
"""

from __future__ import annotations

import importlib
import logging
import os

import click

# name -> "module:attribute" of a click command or group.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("tether.cli.demo:demo", "Run the whole system locally with a simulated fleet."),
    "bundle": ("tether.cli.bundle:bundle", "Build and upload content-addressed task bundles."),
    "status": ("tether.cli.status:status", "Show a task's rollout progress and aggregate."),
    "rollout": ("tether.cli.rollout:rollout", "Pause, resume, promote or abort a staged rollout."),
    "dashboard": ("tether.cli.dashboard_cmd:dashboard", "Serve the web dashboard (tasks, rollouts, fleet, rounds)."),
    "task": ("tether.cli.task_cmd:task", "Build, upload and apply a task directory and its MLTask."),
    "controller": ("tether.cli.controller_cmd:controller", "Run the controller (gRPC distribution service)."),
    "worker": ("tether.cli.worker_cmd:worker", "Run a Celery aggregation worker."),
    "operator": ("tether.cli.operator_cmd:operator", "Run the Kubernetes operator (Kopf)."),
    "agent": ("tether.cli.agent_cmd:agent", "Run or inspect the edge agent."),
    "device": ("tether.cli.device:device", "Manage enrolled devices (list, revoke)."),
    "fl": ("tether.cli.fl_cmd:fl", "Show a federated task's rounds (history, --csv)."),
    "keys": ("tether.cli.keys:keys", "Make and inspect Ed25519 bundle signing keys."),
    "certs": ("tether.cli.certs:certs", "Make a private CA and TLS certificates for the gRPC port."),
    "model": ("tether.cli.model:model", "Convert models between engine formats (ONNX -> MNN)."),
    "bench": ("tether.cli.bench:bench", "Run benchmarks that write machine-readable results."),
    "tunnel": ("tether.cli.tunnel:tunnel", "Read what devices emit over the real-time tunnel (tail TOPIC)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        target, _ = COMMANDS[cmd_name]
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            missing = e.name or "?"
            raise click.ClickException(
                f"`tether {cmd_name}` needs {missing!r}, which is not installed here. "
                "Cloud-side commands need the full install: pip install 'tether[cloud]'."
            ) from e
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Help text without importing every subcommand's dependencies.
        with formatter.section("Commands"):
            formatter.write_dl([(name, COMMANDS[name][1]) for name in sorted(COMMANDS)])


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--log-level",
    default=lambda: os.environ.get("TETHER_LOG_LEVEL", "WARNING"),
    show_default="WARNING",
    help="Python logging level.",
)
def cli(log_level: str) -> None:
    """Tether: a Kubernetes-native control plane for device-cloud collaborative ML."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main() -> None:
    cli(prog_name="tether")


if __name__ == "__main__":
    main()
