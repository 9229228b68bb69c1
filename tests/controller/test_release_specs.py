import json

import pytest

from tether.common import errors
from tether.controller import hub, releases, targeting
from tether.spec import selectors

DIGEST = "sha256:" + "a" * 64
OTHER = "sha256:" + "b" * 64


def spec(**overrides):
    values = {
        "release": "ns/task",
        "generation": 1,
        "manifest_digest": DIGEST,
        "target_json": json.dumps({"matchLabels": {"os": "android"}}),
        "trigger_json": json.dumps({"type": "onInstall"}),
        "aggregation_json": json.dumps({"tensors": "weightedMean"}),
        "paused": False,
        "resources_json": json.dumps({"timeoutSeconds": 60, "memoryMB": 256}),
    }
    values.update(overrides)
    return releases.parse_spec(**values)


def test_valid_spec_parses():
    s = spec()
    assert s.release == "ns/task"
    assert s.target == {"matchLabels": {"os": "android"}}
    assert s.trigger == {"type": "onInstall"}
    assert s.resources == {"timeoutSeconds": 60, "memoryMB": 256}


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"release": "task"}, "release"),
        ({"release": "NS/Task"}, "release"),
        ({"release": "ns/task/x"}, "release"),
        ({"generation": -1}, "generation"),
        ({"manifest_digest": "sha256:xyz"}, "manifest_digest"),
        ({"target_json": "{"}, "target"),
        ({"target_json": json.dumps({"matchLabels": {"os": 1}})}, "target.matchLabels['os']"),
        ({"trigger_json": "[]"}, "trigger"),
        ({"trigger_json": json.dumps({"type": ""})}, "trigger.type"),
        ({"trigger_json": json.dumps({"type": "interval", "seconds": 0})}, "trigger.seconds"),
        ({"trigger_json": json.dumps({"type": "interval", "seconds": "10"})}, "trigger.seconds"),
        ({"trigger_json": json.dumps({"type": "interval", "seconds": 0.5})}, "trigger.seconds"),
        ({"trigger_json": json.dumps({"type": "interval", "seconds": 366 * 86400 + 1})}, "trigger.seconds"),
        ({"aggregation_json": json.dumps({"tensors": "median"})}, "aggregation.tensors"),
        ({"aggregation_json": json.dumps({"metrics": "sum"})}, "aggregation.metrics"),
        ({"aggregation_json": '{"tensors": NaN}'}, "aggregation"),
        ({"aggregation_json": json.dumps({"x": "y" * releases.MAX_POLICY_BYTES})}, "aggregation"),
    ],
)
def test_invalid_specs_name_the_field(overrides, field):
    with pytest.raises(errors.InvalidSpec) as info:
        spec(**overrides)
    assert info.value.field == field
    assert info.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("resources", "field"),
    [
        ("{", "resources"),
        ("[]", "resources"),
        ('"60"', "resources"),
        ('{"timeoutSeconds": NaN}', "resources"),
        (json.dumps({"timeoutSeconds": 0}), "resources.timeoutSeconds"),
        (json.dumps({"timeoutSeconds": 86401}), "resources.timeoutSeconds"),
        (json.dumps({"timeoutSeconds": -5}), "resources.timeoutSeconds"),
        (json.dumps({"timeoutSeconds": 1.5}), "resources.timeoutSeconds"),
        (json.dumps({"timeoutSeconds": "60"}), "resources.timeoutSeconds"),
        (json.dumps({"timeoutSeconds": True}), "resources.timeoutSeconds"),
        (json.dumps({"timeoutSeconds": None}), "resources.timeoutSeconds"),
        (json.dumps({"memoryMB": 15}), "resources.memoryMB"),
        (json.dumps({"memoryMB": 65537}), "resources.memoryMB"),
        (json.dumps({"memoryMB": "512Mi"}), "resources.memoryMB"),
        (json.dumps({"cpuSeconds": 0}), "resources.cpuSeconds"),
        (json.dumps({"cpuSeconds": 86401}), "resources.cpuSeconds"),
        (json.dumps({"cpuSeconds": None}), "resources.cpuSeconds"),
        (json.dumps({"gpus": 1}), "resources.gpus"),
        (json.dumps({"timeout_seconds": 60}), "resources.timeout_seconds"),  # snake case is not the CRD's
        (json.dumps({"memorymb": 64}), "resources.memorymb"),
        (json.dumps({"timeoutSeconds": 60, "memoryMB": 256, "extra": {}}), "resources.extra"),
    ],
)
def test_invalid_resources_name_the_field(resources, field):
    with pytest.raises(errors.InvalidSpec) as info:
        spec(resources_json=resources)
    assert info.value.field == field
    assert info.value.code == "INVALID_ARGUMENT"
    assert str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize(
    "resources",
    [
        {},
        {"timeoutSeconds": 1},
        {"timeoutSeconds": 86400},
        {"memoryMB": 16},
        {"memoryMB": 65536},
        {"cpuSeconds": 1},
        {"cpuSeconds": 86400},
        {"timeoutSeconds": 300, "memoryMB": 512, "cpuSeconds": 120},
    ],
)
def test_resources_within_bounds_are_kept_as_sent(resources):
    assert spec(resources_json=json.dumps(resources)).resources == resources


def test_resources_are_optional():
    assert spec(resources_json="").resources == {}
    values = {
        "release": "ns/task",
        "generation": 1,
        "manifest_digest": DIGEST,
        "target_json": "",
        "trigger_json": "",
        "aggregation_json": "",
        "paused": False,
    }
    assert releases.parse_spec(**values).resources == {}  # a caller that predates resources


def test_policy_json_is_canonical_and_empty_for_the_default():
    assert releases.policy_json({}) == ""
    assert releases.policy_json({"type": "interval", "seconds": 5}) == '{"seconds":5,"type":"interval"}'
    assert releases.policy_json({"memoryMB": 64, "cpuSeconds": 2}) == '{"cpuSeconds":2,"memoryMB":64}'


CRON = {"type": "cron", "schedule": "*/15 9-17 * * mon-fri", "timezone": "Europe/Berlin"}
PATTERN = {
    "type": "pattern",
    "pattern": {"steps": [{"type": "page_view", "page": "item"}, {"type": "add_to_cart"}], "within": 30},
    "cooldownSeconds": 60,
}
WINDOWED = {
    "type": "cron",
    "schedule": "0 * * * *",
    "window": {"seconds": 3600, "types": ["page_view"]},
    "aggregate": [{"name": "dwell", "by": "page", "value": "dwell_ms", "ops": ["count", "mean"]}],
    "conditions": {"charging": True},
}


@pytest.mark.parametrize(
    "trigger",
    [
        {"type": "interval", "seconds": 60},
        {"type": "onDemand"},
        {"type": "onInstall", "conditions": {"idle": True}},
        CRON,
        PATTERN,
        WINDOWED,
    ],
)
def test_every_trigger_type_the_agents_run_is_accepted_unchanged(trigger):
    assert spec(trigger_json=json.dumps(trigger)).trigger == trigger


def test_an_empty_trigger_is_the_default():
    assert spec(trigger_json="").trigger == {}


@pytest.mark.parametrize(
    ("trigger", "field", "words"),
    [
        ({"type": "lunar"}, "trigger.type", "is not one of"),
        ({"type": "cron"}, "trigger.schedule", "non-empty string"),
        ({"type": "cron", "schedule": "61 * * * *"}, "trigger.schedule", "minute: 61"),
        ({"type": "cron", "schedule": "* * *"}, "trigger.schedule", "has 3 fields"),
        ({"type": "cron", "schedule": "0 0 31 2 *"}, "trigger.schedule", "never fires"),
        ({**CRON, "timezone": "Mars/Olympus"}, "trigger.timezone", "unknown time zone"),
        ({"type": "pattern"}, "trigger.pattern", "must be an object"),
        ({**PATTERN, "pattern": {"steps": []}}, "trigger.pattern.steps", "1 to 8 steps"),
        ({**PATTERN, "pattern": {"steps": [{"page": "x"}]}}, "trigger.pattern.steps[0].type", "non-empty"),
        (
            {**PATTERN, "pattern": {"steps": [{"type": "a", "where": {"price": {"approx": 1}}}]}},
            "trigger.pattern.steps[0].where.price",
            "operator 'approx'",
        ),
        ({**PATTERN, "cooldownSeconds": -1}, "trigger.cooldownSeconds", "seconds in"),
        ({"type": "cron", "schedule": "@daily", "cooldownSeconds": 5}, "trigger", "unknown keys"),
        ({"type": "onInstall", "aggregate": [{"by": "page"}]}, "trigger.aggregate", "need a window"),
        ({"type": "onInstall", "window": {"count": 0}}, "trigger.window.count", "integer in"),
        ({"type": "onInstall", "conditions": {"sunny": True}}, "trigger.conditions.sunny", "unknown condition"),
        ({"type": "onInstall", "conditions": {"charging": "yes"}}, "trigger.conditions.charging", "true or false"),
    ],
)
def test_bad_triggers_are_refused_naming_the_field(trigger, field, words):
    with pytest.raises(errors.InvalidSpec) as info:
        spec(trigger_json=json.dumps(trigger))
    assert info.value.field == field
    assert words in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "changed"),
    [
        ({}, False),
        ({"generation": 7}, False),
        ({"paused": True}, False),
        ({"target_json": json.dumps({"matchLabels": {"os": "android"}, "matchExpressions": []})}, False),
        ({"manifest_digest": OTHER}, True),
        ({"target_json": json.dumps({"matchLabels": {"os": "ios"}})}, True),
        ({"trigger_json": json.dumps({"type": "interval", "seconds": 5})}, True),
        ({"aggregation_json": json.dumps({"tensors": "sum"})}, True),
        ({"resources_json": json.dumps({"memoryMB": 256, "timeoutSeconds": 60})}, False),  # key order
        ({"resources_json": json.dumps({"timeoutSeconds": 30, "memoryMB": 256})}, True),
        ({"resources_json": json.dumps({"timeoutSeconds": 60, "memoryMB": 256, "cpuSeconds": 10})}, True),
        ({"resources_json": ""}, True),
    ],
)
def test_content_changed(overrides, changed):
    assert releases.content_changed(spec(), spec(**overrides)) is changed


# ---------------------------------------------------------------- fan-out decisions


def release(*, version=1, paused=False, deleted=False, target=None):
    s = spec(
        paused=paused, target_json=json.dumps(target if target is not None else {"matchLabels": {"os": "android"}})
    )
    return releases.Release(spec=s, version=version, deleted=deleted, target=selectors.parse_target(s.target))


ANDROID = targeting.device_facts(device_id="a", attributes={"os": "android"})
IOS = targeting.device_facts(device_id="i", attributes={"os": "ios"})
N, R, X = hub.Action.NOTIFY, hub.Action.REVOKE, hub.Action.NONE


@pytest.mark.parametrize(
    ("before", "after", "facts", "action"),
    [
        (None, release(), ANDROID, N),  # new release
        (None, release(), IOS, X),  # not targeted
        (release(), release(version=2), ANDROID, N),  # new version
        (release(), release(), ANDROID, X),  # nothing new
        (release(), release(version=2), IOS, X),
        (release(), None, ANDROID, R),  # deleted
        (release(), None, IOS, X),
        (release(), release(version=2, target={"matchLabels": {"os": "ios"}}), ANDROID, R),  # untargeted
        (release(), release(version=2, target={"matchLabels": {"os": "ios"}}), IOS, N),  # newly targeted
        (release(), release(version=2, paused=True), ANDROID, X),  # paused: no pushes
        (release(paused=True), release(), ANDROID, N),  # unpaused: push again
        (release(deleted=True), release(version=2), ANDROID, N),  # revived
        (release(), release(version=2, paused=True, target={"matchLabels": {"os": "ios"}}), ANDROID, R),
    ],
)
def test_fanout_action(before, after, facts, action):
    assert hub.fanout_action(before=before, after=after, facts=facts) is action


@pytest.mark.parametrize(
    ("paused", "delivered", "offered"),
    [(False, False, True), (False, True, True), (True, False, False), (True, True, True)],
)
def test_paused_release_stays_with_devices_that_have_it(paused, delivered, offered):
    assert release(paused=paused).offered_to(ANDROID, delivered=delivered) is offered
    assert not release(paused=paused).offered_to(IOS, delivered=delivered)


FEDERATED = {"rounds": 3, "participants": {"count": 2}, "strategy": {"name": "fedAvg"}}


def test_spec_federated_travels_as_a_document_parsed_by_the_shared_parser():
    s = spec(federated_json=json.dumps(FEDERATED))
    assert s.federated == FEDERATED
    rules = s.rules()
    assert rules is not None and rules.rounds == 3 and rules.model_file == "model.safetensors"
    assert spec().rules() is None  # not federated


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"rounds": 3}, "federated.participants"),
        ({**FEDERATED, "updateEncoding": "int4"}, "federated.updateEncoding"),
        ({**FEDERATED, "modelFile": "../w.safetensors"}, "federated.modelFile"),
        ([], "federated"),
    ],
)
def test_a_bad_federated_document_is_refused_naming_the_field(doc, field):
    with pytest.raises(errors.InvalidSpec) as info:
        spec(federated_json=json.dumps(doc))
    assert info.value.field == field


def test_a_change_of_spec_federated_is_a_change_of_content():
    base = spec(federated_json=json.dumps(FEDERATED))
    assert not releases.content_changed(base, spec(federated_json=json.dumps(FEDERATED)))
    assert releases.content_changed(base, spec(federated_json=json.dumps({**FEDERATED, "rounds": 4})))
    assert releases.content_changed(base, spec())
