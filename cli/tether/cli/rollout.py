"""`tether rollout pause|resume|promote|abort TASK`: steer a staged rollout without kubectl.

Each command patches the MLTask object (`tether.common.rollout_controls`) (a JSON merge patch through the
Kubernetes API); the operator acts on it:
- pause:   `spec.paused: true` (the current stage holds; nothing new is pushed);
- resume:  `spec.paused: false` plus the `tether.dev/resume` annotation (a
           rollout paused by a failed gate restarts its stage's bake);
- promote: the `tether.dev/promote` annotation (skip the rest of the current
           stage's bake and gates);
- abort:   the `tether.dev/abort` annotation (every device goes back to the
           previous version, or a first release is uninstalled).

Annotations carry a timestamp, so asking twice acts twice; the operator
records each value it acted on in `status.rollout.handled`.
"""

from __future__ import annotations

import asyncio

import click

from tether.common import errors, rollout_controls

# The patches live in tether.common.rollout_controls (the dashboard sends the same ones).
patch_for = rollout_controls.patch_for
split = rollout_controls.split
ANNOTATIONS = rollout_controls.ANNOTATIONS


async def request(action: str, task: str, *, namespace: str | None, kubeconfig: str | None) -> str:
    from tether.common import kube

    credentials = await kube.load(kubeconfig)
    ns, name = rollout_controls.split(task, namespace, credentials.namespace)
    async with kube.KubeClient(credentials) as client:
        return await rollout_controls.apply(client, action, ns, name)


def _command(action: str, help_text: str) -> click.Command:
    @click.command(name=action, help=help_text)
    @click.argument("task")
    @click.option("-n", "--namespace", default=None, help="Namespace of TASK (default: the context's).")
    @click.option("--kubeconfig", envvar="KUBECONFIG", default=None, help="kubeconfig file (default: in-cluster).")
    def cmd(task: str, namespace: str | None, kubeconfig: str | None) -> None:
        try:
            click.echo(asyncio.run(request(action, task, namespace=namespace, kubeconfig=kubeconfig)))
        except errors.TetherError as e:
            raise click.ClickException(str(e)) from None

    return cmd


@click.group()
def rollout() -> None:
    """Pause, resume, promote or abort a task's staged rollout (patches the MLTask)."""


rollout.add_command(_command("pause", "Hold the current stage: spec.paused = true."))
rollout.add_command(_command("resume", "Resume a paused rollout (the current stage's bake restarts)."))
rollout.add_command(_command("promote", "Skip the rest of the current stage's bake and gates."))
rollout.add_command(_command("abort", "Roll every device back to the previous version."))
