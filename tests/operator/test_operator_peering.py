"""Operator HA: with --peering, replicas meet in a Kopf peering object and one works (the chart runs two)."""

from __future__ import annotations

import kopf
import pytest
from click.testing import CliRunner

from tether.cli.main import cli
from tether.operator import handlers


def settings_for(**kwargs: object) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    handlers.configure(settings, **kwargs)  # type: ignore[arg-type]
    return settings


def test_without_peering_the_operator_runs_standalone() -> None:
    assert settings_for().peering.standalone is True


@pytest.mark.parametrize("clusterwide", [True, False])
def test_peering_is_mandatory_and_named(clusterwide: bool) -> None:
    peering = settings_for(peering="tether-operator", priority=7, clusterwide=clusterwide).peering
    assert peering.standalone is False and peering.mandatory is True  # a missing object is an error, not solo
    assert (peering.name, peering.priority, peering.clusterwide) == ("tether-operator", 7, clusterwide)
    assert peering.lifetime == handlers.PEERING_LIFETIME_S


def test_replicas_without_a_priority_get_distinct_ones() -> None:
    # Kopf pauses every operator whose peer has an equal priority: two replicas of one Deployment
    # must not share one, or neither would work.
    priorities = {settings_for(peering="p").peering.priority for _ in range(50)}
    assert len(priorities) == 50 and min(priorities) >= 1


def test_priority_without_peering_is_refused() -> None:
    result = CliRunner().invoke(cli, ["operator", "--admin-token", "t" * 20, "--priority", "5"])
    assert result.exit_code == 2 and "--priority needs --peering" in result.output
