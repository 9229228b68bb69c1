"""Kopf handlers for MLTask: thin adapters around `reconcile`.

Each handler reads the object, calls the pure `reconcile.decide`, performs the
resulting actions on the controller through a `ReleaseAdmin`, folds their
outcomes back in (`Decision.with_outcome`), posts Events for transitions and
patches the status once, and only when it changed.

- create / update / resume: validate and apply the release;
- a timer (every `poll_interval` seconds) asks the controller for the
  release's status and retries an apply that has not succeeded yet;
- delete: delete the release (a finalizer holds the object until the
  controller confirms; an unreachable controller is retried).

An invalid spec gets `phase: Invalid`, a `Valid=False` condition naming the
field, a Warning Event, and nothing is sent to the controller.

Handlers are registered on a registry of their own (`build_registry`), so
the poll interval is a parameter and nothing leaks into Kopf's default one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import logging
import pathlib
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import kopf

from tether.common import errors, exposition, kube, tracing
from tether.operator import model, operator_metrics, progression, reconcile

logger = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL = 5.0
ANNOTATION_PREFIX = model.GROUP  # Kopf's own bookkeeping lives in tether.dev/* annotations
FINALIZER = f"{model.GROUP}/release"
REPORTING_COMPONENT = "tether-operator"
PEERING_LIFETIME_S = 30  # a paused replica takes over within about this long after the active one stops


class ReleaseAdmin(Protocol):
    """What the operator needs from the controller's admin API."""

    async def apply(self, action: reconcile.ApplyRelease) -> reconcile.Applied: ...

    async def delete(self, action: reconcile.DeleteRelease) -> reconcile.Deleted: ...

    async def observe(self, release: str, *, report_deadline_s: int | None = None) -> reconcile.ObservedRelease | None:
        """The release's status (silent devices counted past `report_deadline_s`), None if there is no such release."""
        ...


@dataclasses.dataclass
class OperatorContext:
    """Per-operator state handed to every handler as Kopf's `memo`."""

    admin: ReleaseAdmin
    poll_interval: float = DEFAULT_POLL_INTERVAL
    clock: Callable[[], datetime.datetime] = dataclasses.field(default=lambda: datetime.datetime.now(datetime.UTC))
    metrics: operator_metrics.OperatorMetrics = dataclasses.field(default_factory=operator_metrics.OperatorMetrics)


# ------------------------------------------------------------------ settings and login


def configure(
    settings: kopf.OperatorSettings,
    *,
    peering: str | None = None,
    priority: int | None = None,
    clusterwide: bool = True,
) -> None:
    """Kopf settings for Tether: namespaced, no cluster scanning, our own annotation prefix.

    Without `peering` the operator runs standalone (exactly one may run). With it, replicas meet in
    that Kopf peering object (a ClusterKopfPeering when watching all namespaces, else a KopfPeering
    in each watched namespace; it must exist: the chart installs it): the one with the highest
    priority works, the others pause until its record lapses (`lifetime` seconds after it stops).
    Kopf pauses every operator of equal priority, so each replica takes a random one unless given.
    """
    settings.scanning.disabled = True  # explicit namespaces; no CRD or namespace watching
    if peering is None:
        settings.peering.standalone = True
    else:
        settings.peering.standalone = False
        settings.peering.mandatory = True  # no silent standalone when the peering object is missing
        settings.peering.name = peering
        settings.peering.clusterwide = clusterwide
        settings.peering.priority = priority if priority is not None else secrets.randbelow(2**31 - 1) + 1
        settings.peering.lifetime = PEERING_LIFETIME_S
        settings.peering.stealth = True  # keep-alives are not news; pauses and resumes are logged anyway
    settings.posting.reporting_component = REPORTING_COMPONENT
    settings.posting.event_name_prefix = "tether-"
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.execution.default_backoff = 5  # unexpected errors are retried soon, not after a minute
    settings.watching.connect_timeout = 10
    settings.watching.server_timeout = 300


def connection_info(credentials: kube.Credentials) -> kopf.ConnectionInfo:
    """Kopf's view of credentials the official client resolved (token from any user kind, certificates, CA)."""
    c = credentials.configuration
    scheme, token = (credentials.authorization or " ").split(" ", 1)
    return kopf.ConnectionInfo(
        server=str(c.host),
        ca_path=c.ssl_ca_cert,
        insecure=not c.verify_ssl,
        certificate_path=c.cert_file,
        private_key_path=c.key_file,
        scheme=scheme or None,
        token=token or None,
        default_namespace=credentials.namespace,
        expiration=credentials.expires,  # Kopf logs in again (the exec plugin runs again) when it passes
    )


async def login_with(kubeconfig: pathlib.Path | None) -> kopf.ConnectionInfo:
    """The kubeconfig given, else $KUBECONFIG / ~/.kube/config, else the service account: as kubectl does."""
    try:
        return connection_info(await kube.load(kubeconfig))
    except errors.TetherError as e:
        raise kopf.LoginError(str(e)) from None


# ------------------------------------------------------------------ handlers


def _meta(body: kopf.Body) -> reconcile.Meta:
    annotations = body.metadata.annotations or {}
    return reconcile.Meta(
        name=body.metadata.name,
        namespace=body.metadata.namespace or "",
        generation=int(body.metadata.get("generation") or 1),
        annotations={k: str(v) for k, v in annotations.items() if k in progression.REQUEST_ANNOTATIONS.values()},
    )


async def perform(admin: ReleaseAdmin, action: reconcile.Action) -> reconcile.Outcome:
    """Carry out one action; every failure becomes a `reconcile.Failed` outcome."""
    try:
        if isinstance(action, reconcile.ApplyRelease):
            return await admin.apply(action)
        return await admin.delete(action)
    except (errors.TetherError, OSError, TimeoutError) as e:  # anything else is a bug: Kopf retries
        return reconcile.failed_from_any(e)


async def _reconcile(ctx: OperatorContext, *, body: kopf.Body, patch: kopf.Patch, poll: bool) -> None:
    trigger = "poll" if poll else "change"
    started = time.perf_counter()
    try:  # a trace starts here: ApplyRelease, the devices' work and the aggregation join it
        with tracing.span(f"reconcile {trigger}", mltask=f"{body.metadata.namespace}/{body.metadata.name}"):
            await _reconcile_once(ctx, body=body, patch=patch, poll=poll)
    except BaseException:
        ctx.metrics.reconciles.labels(trigger, "error").inc()
        raise
    else:
        ctx.metrics.reconciles.labels(trigger, "ok").inc()
    finally:
        ctx.metrics.duration.labels(trigger).observe(time.perf_counter() - started)


async def _reconcile_once(ctx: OperatorContext, *, body: kopf.Body, patch: kopf.Patch, poll: bool) -> None:
    meta = _meta(body)
    current = reconcile.parse_status(body.get("status"))
    observed: reconcile.ObservedRelease | None = None
    if poll and current.release:
        try:
            deadline = reconcile.report_deadline(body.get("spec"))
            observed = await ctx.admin.observe(current.release, report_deadline_s=deadline)
        except (errors.TetherError, OSError, TimeoutError) as e:
            logger.warning("polling release %s failed: %s", current.release, e)
    now = ctx.clock()
    decision = reconcile.decide(spec=body.get("spec"), meta=meta, status=current, observed=observed, now=now)
    performed = 0
    while decision.actions and performed < 4:  # an apply may ask for one follow-up (a new version's first stage)
        action = decision.actions[0]
        decision = decision.with_outcome(action, await perform(ctx.admin, action), now=now)
        performed += 1
    for event in reconcile.transition_events(current, decision.status):
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
    ctx.metrics.task_status(
        namespace=meta.namespace, name=meta.name, status=decision.status, judged=observed is not None
    )
    changes = reconcile.status_patch(current, decision.status)
    if changes:
        patch.setdefault("status", {}).update(changes)


async def on_change(body: kopf.Body, patch: kopf.Patch, memo: Any, **_: Any) -> None:
    """create / update / resume: validate, apply the release, write the status."""
    await _reconcile(memo, body=body, patch=patch, poll=False)


async def on_poll(body: kopf.Body, patch: kopf.Patch, memo: Any, **_: Any) -> None:
    """Timer: refresh the status from the controller; retry an apply that did not succeed."""
    await _reconcile(memo, body=body, patch=patch, poll=True)


async def on_delete(body: kopf.Body, memo: Any, **_: Any) -> None:
    """Delete the release; keep the object (finalizer) while the controller cannot be reached."""
    ctx: OperatorContext = memo
    meta = _meta(body)
    actions = reconcile.decide_delete(meta=meta, status=reconcile.parse_status(body.get("status")))
    for action in actions:
        outcome = await perform(ctx.admin, action)
        if isinstance(outcome, reconcile.Failed):
            if outcome.transient:
                ctx.metrics.reconciles.labels("delete", "error").inc()
                raise kopf.TemporaryError(f"deleting {action.release}: {outcome.message}", delay=ctx.poll_interval)
            kopf.warn(body, reason="DeleteFailed", message=f"The controller refused to delete: {outcome.message}")
    ctx.metrics.reconciles.labels("delete", "ok").inc()
    ctx.metrics.forget(namespace=meta.namespace, name=meta.name)


def build_registry(
    *,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    kubeconfig: pathlib.Path | None = None,
) -> kopf.OperatorRegistry:
    """A registry with the MLTask handlers, the timer at `poll_interval`, and the login."""
    registry = kopf.OperatorRegistry()

    kopf.on.create(model.GROUP, model.VERSION, model.PLURAL, registry=registry, id="reconcile")(on_change)
    kopf.on.update(model.GROUP, model.VERSION, model.PLURAL, registry=registry, id="reconcile", field="spec")(on_change)
    kopf.on.resume(model.GROUP, model.VERSION, model.PLURAL, registry=registry, id="reconcile")(on_change)
    # `tether rollout promote|abort|resume` (or kubectl annotate) act at once, not at the next poll.
    kopf.on.update(
        model.GROUP, model.VERSION, model.PLURAL, registry=registry, id="rollout-request", field="metadata.annotations"
    )(on_poll)
    kopf.on.delete(model.GROUP, model.VERSION, model.PLURAL, registry=registry, id="delete-release")(on_delete)
    kopf.timer(
        model.GROUP,
        model.VERSION,
        model.PLURAL,
        registry=registry,
        id="poll",
        interval=poll_interval,
        initial_delay=poll_interval,
    )(on_poll)

    @kopf.on.login(registry=registry)
    async def login(**_: Any) -> kopf.ConnectionInfo:
        return await login_with(kubeconfig)

    return registry


async def run(
    *,
    admin: ReleaseAdmin,
    namespaces: Sequence[str] = (),
    poll_interval: float = DEFAULT_POLL_INTERVAL,
    kubeconfig: pathlib.Path | None = None,
    stop_flag: asyncio.Event | asyncio.Future[Any] | None = None,
    ready_flag: asyncio.Event | asyncio.Future[Any] | None = None,
    liveness_endpoint: str | None = None,
    metrics: operator_metrics.OperatorMetrics | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "0.0.0.0",
    peering: str | None = None,
    priority: int | None = None,
) -> None:
    """Run the operator until `stop_flag` is set (or SIGINT/SIGTERM in the main thread).

    With `namespaces`, only those are watched (one watch each); without, one cluster-wide watch.
    `metrics_port`: serve /metrics there (0: a free port; None: not served).
    `peering`: run as one of several replicas, one active (see `configure`).
    """
    settings = kopf.OperatorSettings()
    configure(settings, peering=peering, priority=priority, clusterwide=not namespaces)
    metrics = metrics if metrics is not None else operator_metrics.OperatorMetrics()
    server = None if metrics_port is None else exposition.serve(metrics.registry, port=metrics_port, host=metrics_host)
    try:
        await _operate(
            admin=admin,
            namespaces=namespaces,
            poll_interval=poll_interval,
            kubeconfig=kubeconfig,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            liveness_endpoint=liveness_endpoint,
            settings=settings,
            metrics=metrics,
        )
    finally:
        if server is not None:  # last: a scrape during shutdown still gets an answer
            server.stop()


async def _operate(
    *,
    admin: ReleaseAdmin,
    namespaces: Sequence[str],
    poll_interval: float,
    kubeconfig: pathlib.Path | None,
    stop_flag: asyncio.Event | asyncio.Future[Any] | None,
    ready_flag: asyncio.Event | asyncio.Future[Any] | None,
    liveness_endpoint: str | None,
    settings: kopf.OperatorSettings,
    metrics: operator_metrics.OperatorMetrics,
) -> None:
    await kopf.operator(
        registry=build_registry(poll_interval=poll_interval, kubeconfig=kubeconfig),
        settings=settings,
        clusterwide=not namespaces,
        namespaces=list(namespaces),
        standalone=settings.peering.standalone,
        peering_name=settings.peering.name if not settings.peering.standalone else None,
        priority=settings.peering.priority,
        memo=OperatorContext(admin=admin, poll_interval=poll_interval, metrics=metrics),
        stop_flag=stop_flag,
        ready_flag=ready_flag,
        liveness_endpoint=liveness_endpoint,
    )
