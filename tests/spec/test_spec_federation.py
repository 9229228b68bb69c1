"""The shared parser of `spec.federated`: strategies, and the rest of the federated rules."""

from __future__ import annotations

import pytest

from tether.common import errors
from tether.spec import federation, strategies


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (None, strategies.FedAvg()),
        ({"name": "fedAvg"}, strategies.FedAvg()),
        ({"name": "fedProx", "proximalMu": 0.01}, strategies.FedProx(proximal_mu=0.01)),
        ({"name": "fedAvgM"}, strategies.FedAvgM(server_learning_rate=1.0, momentum=0.9)),
        (
            {"name": "fedYogi", "serverLearningRate": 0.01, "tau": 0.001},
            strategies.FedOpt(optimizer=strategies.ServerOptimizer.YOGI, server_learning_rate=0.01, tau=0.001),
        ),
        ({"name": "fedAdagrad"}, strategies.FedOpt(optimizer=strategies.ServerOptimizer.ADAGRAD)),
        ({"name": "median"}, strategies.Median()),
        ({"name": "trimmedMean", "trimFraction": 0.2}, strategies.TrimmedMean(trim_fraction=0.2)),
        ({"name": "krum", "byzantine": 2}, strategies.Krum(byzantine=2, selected=1)),
        ({"name": "multiKrum", "byzantine": 1, "selected": 4}, strategies.Krum(byzantine=1, selected=4)),
    ],
)
def test_strategies_parse_and_round_trip(doc, expected) -> None:
    parsed = strategies.parse_strategy(doc)
    assert parsed == expected
    assert strategies.parse_strategy(strategies.strategy_document(parsed)) == parsed


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
        strategies.parse_strategy(doc)
    assert e.value.field == field
    assert words in str(e.value)


FULL = {
    "rounds": 30,
    "stopOn": {"metric": "accuracy", "target": 0.9, "patience": 5, "minDelta": 0.001},
    "participants": {"count": 10},
    "overSelection": 0.3,
    "quorum": {"fraction": 0.8},
    "seed": 7,
    "roundDeadlineSeconds": 120,
    "onQuorumMissed": "fail",
    "maxExtensions": 0,
    "lateUpdates": "keep",
    "strategy": {"name": "fedProx", "proximalMu": 0.1},
    "privacy": {"mode": "local", "clipNorm": 1.0, "noiseMultiplier": 0.5},
    "evaluation": {
        "metric": "accuracy",
        "every": 2,
        "server": {"file": "cloud/heldout.npz", "model": "cloud/model.onnx"},
        "devices": {"count": 5},
    },
}


def test_a_full_document_parses_into_its_typed_value() -> None:
    f = federation.parse_federation(FULL)
    assert f is not None
    assert f.rounds == 30 and f.seed == 7 and f.round_deadline_s == 120
    assert f.stop_on == federation.StopOn(metric="accuracy", target=0.9, patience=5, min_delta=0.001)
    assert f.participants == federation.Share(count=10) and f.quorum == federation.Share(fraction=0.8)
    assert f.on_quorum_missed is federation.QuorumMissed.FAIL and f.max_extensions == 0
    assert f.late_updates is federation.LateUpdates.KEEP
    assert f.strategy == strategies.FedProx(proximal_mu=0.1)
    assert f.evaluation == federation.Evaluation(
        metric="accuracy",
        every=2,
        server_file="cloud/heldout.npz",
        server_model="cloud/model.onnx",
        devices=federation.Share(count=5),
    )
    assert f.evaluation is not None and [f.evaluation.evaluates_round(n) for n in (1, 2, 3, 4)] == [
        False,
        True,
        False,
        True,
    ]
    assert f.task_parameters() == {"proximalMu": 0.1, "clipNorm": 1.0, "noiseMultiplier": 0.5}


def test_defaults_and_the_numbers_a_round_resolves_to() -> None:
    f = federation.parse_federation({"rounds": 3, "participants": {"fraction": 0.1}})
    assert f is not None
    assert f.strategy == strategies.FedAvg() and f.privacy is None and f.evaluation is None
    assert f.quorum == federation.Share(fraction=1.0) and f.over_selection == 0.0
    assert f.on_quorum_missed is federation.QuorumMissed.EXTEND and f.late_updates is federation.LateUpdates.REFUSE
    assert (f.selected(100), f.quorum_of(100)) == (10, 10)
    assert (f.selected(5), f.quorum_of(5)) == (1, 1)  # at least one device
    assert (f.selected(0), f.quorum_of(0)) == (0, 1)  # nobody eligible: the round cannot reach its quorum
    assert federation.parse_federation(None) is None
    over = federation.parse_federation({"rounds": 1, "participants": {"count": 10}, "overSelection": 0.3})
    assert over is not None and over.selected(100) == 13 and over.selected(11) == 11
    assert federation.Share(fraction=0.3).of(10) == 3  # no float noise: 0.3 * 10 is not 4


def test_stop_on_alone_caps_the_rounds() -> None:
    f = federation.parse_federation(
        {
            "participants": {"count": 2},
            "stopOn": {"metric": "loss", "mode": "min", "patience": 3},
            "evaluation": {"metric": "loss", "devices": {"count": 2}},
        }
    )
    assert f is not None and f.rounds == federation.DEFAULT_ROUNDS_WITH_STOP
    assert f.stop_on is not None and f.stop_on.goal is federation.Goal.MIN


def _with(**changes):
    doc = {k: v for k, v in FULL.items()}
    for k, v in changes.items():
        if v is None:
            doc.pop(k, None)
        else:
            doc[k] = v
    return doc


@pytest.mark.parametrize(
    ("doc", "field", "words"),
    [
        ("yes", "federated", "must be an object"),
        (_with(epochs=3), "federated", "unknown fields ['epochs']"),
        (_with(rounds=None, stopOn=None), "federated.rounds", "required unless stopOn"),
        (_with(rounds=0), "federated.rounds", "[1, 100000]"),
        (_with(participants=None), "federated.participants", "is required"),
        (_with(participants={"count": 3, "fraction": 0.5}), "federated.participants", "exactly one"),
        (_with(participants={"fraction": 0}), "federated.participants.fraction", "(0, 1]"),
        (_with(participants={"count": 0}), "federated.participants.count", "[1, 1000000]"),
        (_with(quorum={"count": 11}), "federated.quorum.count", "only 10 participants"),
        (_with(overSelection=2), "federated.overSelection", "[0, 1]"),
        (_with(seed=-1), "federated.seed", "integer"),
        (_with(roundDeadlineSeconds=0), "federated.roundDeadlineSeconds", "[1, 604800]"),
        (_with(onQuorumMissed="wait"), "federated.onQuorumMissed", "'wait' is not one of ['extend', 'fail']"),
        (_with(lateUpdates="fold"), "federated.lateUpdates", "'fold'"),
        (_with(strategy={"name": "fedAvgM", "tau": 1}), "federated.strategy.tau", "not a parameter of fedAvgM"),
        (
            _with(strategy={"name": "krum", "byzantine": 2}, quorum={"count": 5}),
            "federated.quorum.count",
            "needs at least 7 updates",
        ),
        (
            _with(strategy={"name": "median"}, privacy={"clipNorm": 1, "noiseMultiplier": 1}),
            "federated.privacy.mode",
            "median is not a mean",
        ),
        (_with(privacy={"clipNorm": 1}), "federated.privacy.noiseMultiplier", "is required"),
        (_with(stopOn={"metric": "accuracy"}), "federated.stopOn", "target, a patience"),
        (_with(stopOn={"metric": "f1", "target": 0.5}), "federated.stopOn.metric", "'f1' is not the evaluated"),
        (_with(evaluation=None), "federated.stopOn", "needs an evaluation"),
        (_with(evaluation={"metric": "accuracy"}), "federated.evaluation", "needs a server held-out set"),
        (
            _with(evaluation={"server": {"file": "../secrets", "model": "m.onnx"}}),
            "federated.evaluation.server.file",
            "inside the bundle",
        ),
        (
            _with(evaluation={"server": {"file": "cloud/heldout.npz"}}),
            "federated.evaluation.server.model",
            "needs the ONNX graph",
        ),
        (
            _with(
                stopOn={"metric": "f1", "target": 0.5},
                evaluation={"metric": "f1", "server": {"file": "h.npz", "model": "m.onnx"}},
            ),
            "federated.evaluation.metric",
            "reports ['accuracy', 'loss'], not 'f1'",
        ),
        (_with(evaluation={"server": {"path": "x"}}), "federated.evaluation.server", "unknown fields ['path']"),
        (_with(evaluation={"every": 0, "devices": {"count": 1}}), "federated.evaluation.every", "[1, 100000]"),
        (_with(stopOn={"metric": "acc uracy", "target": 1}), "federated.stopOn.metric", "metric name"),
    ],
)
def test_bad_round_rules_name_their_field(doc, field, words) -> None:
    with pytest.raises(errors.InvalidSpec) as e:
        federation.parse_federation(doc)
    assert e.value.field == field
    assert words in str(e.value)
