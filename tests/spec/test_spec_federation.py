"""The shared parser of `spec.federated`: strategies, and the rest of the federated rules."""

from __future__ import annotations

import pytest

from tether.common import errors
from tether.spec import federation


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (None, federation.FedAvg()),
        ({"name": "fedAvg"}, federation.FedAvg()),
        ({"name": "fedProx", "proximalMu": 0.01}, federation.FedProx(proximal_mu=0.01)),
        ({"name": "fedAvgM"}, federation.FedAvgM(server_learning_rate=1.0, momentum=0.9)),
        (
            {"name": "fedYogi", "serverLearningRate": 0.01, "tau": 0.001},
            federation.FedOpt(optimizer=federation.ServerOptimizer.YOGI, server_learning_rate=0.01, tau=0.001),
        ),
        ({"name": "fedAdagrad"}, federation.FedOpt(optimizer=federation.ServerOptimizer.ADAGRAD)),
        ({"name": "median"}, federation.Median()),
        ({"name": "trimmedMean", "trimFraction": 0.2}, federation.TrimmedMean(trim_fraction=0.2)),
        ({"name": "krum", "byzantine": 2}, federation.Krum(byzantine=2, selected=1)),
        ({"name": "multiKrum", "byzantine": 1, "selected": 4}, federation.Krum(byzantine=1, selected=4)),
    ],
)
def test_strategies_parse_and_round_trip(doc, expected) -> None:
    parsed = federation.parse_strategy(doc)
    assert parsed == expected
    assert federation.parse_strategy(federation.strategy_document(parsed)) == parsed


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ([], "strategy", "must be an object"),
        ({"name": "fedSgd"}, "strategy.name", "'fedSgd' is not one of"),
        ({"name": "fedAvg", "momentum": 0.9}, "strategy.momentum", "fedAvg, which takes no parameters"),
        ({"name": "fedAdagrad", "beta1": 0.9}, "strategy.beta1", "takes serverLearningRate, tau"),
        ({"name": "fedProx"}, "strategy.proximalMu", "required for fedProx"),
        ({"name": "fedProx", "proximalMu": -1}, "strategy.proximalMu", "[0, 10000]"),
        ({"name": "fedAvgM", "momentum": 1.0}, "strategy.momentum", "[0, 1)"),
        ({"name": "fedAdam", "tau": 0}, "strategy.tau", "(0, 1]"),
        ({"name": "fedAdam", "serverLearningRate": float("nan")}, "strategy.serverLearningRate", "nan"),
        ({"name": "fedAdam", "beta2": True}, "strategy.beta2", "True"),
        ({"name": "trimmedMean", "trimFraction": 0.5}, "strategy.trimFraction", "[0, 0.5)"),
        ({"name": "krum", "byzantine": 1.5}, "strategy.byzantine", "integer"),
        ({"name": "krum", "selected": 3}, "strategy.selected", "krum, which takes byzantine"),
        ({"name": "multiKrum", "byzantine": 1}, "strategy.selected", "required for multiKrum"),
    ],
)
def test_a_bad_strategy_names_its_field(doc, field, words) -> None:
    with pytest.raises(errors.InvalidSpec) as e:
        federation.parse_strategy(doc)
    assert e.value.field == field
    assert words in str(e.value)
