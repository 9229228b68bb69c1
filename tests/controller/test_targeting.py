import pytest

from tether.common import errors
from tether.controller import targeting
from tether.spec import selectors, wire

ANDROID_HIGH = {"os": "android", "tier": "high", "region": "eu"}
BACKEND, DEVICE_ID = selectors.BACKEND_KEY, selectors.DEVICE_ID_KEY
EXPR0 = "target.matchExpressions[0]"


def expr(key, operator, *values, **extra):
    """A one-expression target document."""
    e = {"key": key, "operator": operator, **extra}
    if values:
        e["values"] = list(values)
    return {"matchExpressions": [e]}


def facts(attributes=None, backends=(), device_id="d1"):
    return targeting.device_facts(device_id=device_id, attributes=attributes or {}, backends=backends)


@pytest.mark.parametrize(
    ("doc", "attributes", "backends", "expected"),
    [
        # empty targets everything
        ({}, {}, (), True),
        (None, ANDROID_HIGH, (), True),
        ({"matchLabels": {}, "matchExpressions": []}, ANDROID_HIGH, (), True),
        # matchLabels
        ({"matchLabels": {"os": "android"}}, ANDROID_HIGH, (), True),
        ({"matchLabels": {"os": "ios"}}, ANDROID_HIGH, (), False),
        ({"matchLabels": {"os": "android", "tier": "low"}}, ANDROID_HIGH, (), False),
        ({"matchLabels": {"missing": "x"}}, ANDROID_HIGH, (), False),
        # In
        (expr("tier", "In", "high", "mid"), ANDROID_HIGH, (), True),
        (expr("tier", "In", "low"), ANDROID_HIGH, (), False),
        (expr("nokey", "In", "x"), ANDROID_HIGH, (), False),
        # NotIn (a missing key is "not in", as in Kubernetes)
        (expr("region", "NotIn", "us"), ANDROID_HIGH, (), True),
        (expr("region", "NotIn", "eu"), ANDROID_HIGH, (), False),
        (expr("nokey", "NotIn", "eu"), ANDROID_HIGH, (), True),
        # Exists / DoesNotExist
        (expr("os", "Exists"), ANDROID_HIGH, (), True),
        (expr("beta", "Exists"), ANDROID_HIGH, (), False),
        (expr("beta", "DoesNotExist"), ANDROID_HIGH, (), True),
        (expr("os", "DoesNotExist"), ANDROID_HIGH, (), False),
        # AND of all clauses
        (
            {
                "matchLabels": {"os": "android"},
                "matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["high"]},
                    {"key": "region", "operator": "NotIn", "values": ["cn"]},
                ],
            },
            ANDROID_HIGH,
            (),
            True,
        ),
        (
            {
                "matchLabels": {"os": "android"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["x"]}],
            },
            ANDROID_HIGH,
            (),
            False,
        ),
        # backends pseudo attribute: multi-valued, In means "has any of"
        (
            expr(BACKEND, "In", "mnn/opencl"),
            {},
            ("mnn/cpu", "mnn/opencl"),
            True,
        ),
        (
            expr(BACKEND, "In", "mnn/opencl"),
            {},
            ("mnn/cpu",),
            False,
        ),
        (
            expr(BACKEND, "NotIn", "onnxruntime/cpu"),
            {},
            ("mnn/cpu",),
            True,
        ),
        (expr(BACKEND, "Exists"), {}, (), False),
        (expr(BACKEND, "Exists"), {}, ("mnn/cpu",), True),
        ({"matchLabels": {selectors.BACKEND_KEY: "mnn/cpu"}}, {}, ("mnn/cpu", "onnxruntime/cpu"), True),
        # device-id pseudo attribute: explicit cohorts and exclusions
        (
            expr(DEVICE_ID, "In", "d1", "d9"),
            {},
            (),
            True,
        ),
        (
            expr(DEVICE_ID, "NotIn", "d1"),
            {},
            (),
            False,
        ),
    ],
)
def test_target_matrix(doc, attributes, backends, expected):
    target = selectors.parse_target(doc)
    assert target.matches(facts(attributes, backends)) is expected


def test_device_cannot_spoof_pseudo_attributes_through_attributes():
    f = targeting.device_facts(device_id="real", attributes={selectors.DEVICE_ID_KEY: "other"}, backends=())
    assert f[selectors.DEVICE_ID_KEY] == frozenset({"real"})
    f = targeting.device_facts(device_id="real", attributes={selectors.BACKEND_KEY: "mnn/gpu"}, backends=())
    assert selectors.BACKEND_KEY not in f


def test_matches_helper():
    target = selectors.parse_target({"matchLabels": {"os": "ios"}})
    assert targeting.matches(target, device_id="x", attributes={"os": "ios"})
    assert not targeting.matches(target, device_id="x", attributes={"os": "android"})


@pytest.mark.parametrize(
    ("doc", "field", "fragment"),
    [
        ([], "target", "must be an object"),
        ({"matchLabel": {"os": "x"}}, "target", "unknown fields"),
        ({"matchLabels": []}, "target.matchLabels", "object"),
        ({"matchLabels": {"os": 3}}, "target.matchLabels['os']", "string"),
        ({"matchLabels": {"": "x"}}, "target.matchLabels['']", "key"),
        ({"matchLabels": {"bad key": "x"}}, "target.matchLabels['bad key']", "key"),
        ({"matchExpressions": {}}, "target.matchExpressions", "list"),
        ({"matchExpressions": ["x"]}, EXPR0, "object"),
        (
            expr("os", "Gt", "1"),
            f"{EXPR0}.operator",
            "not one of",
        ),
        (expr("os", "In"), f"{EXPR0}.values", "at least one"),
        (
            expr("os", "In"),
            f"{EXPR0}.values",
            "at least one",
        ),
        (
            expr("os", "Exists", "a"),
            f"{EXPR0}.values",
            "takes no values",
        ),
        (
            {"matchExpressions": [{"key": "os", "operator": "In", "values": "android"}]},
            f"{EXPR0}.values",
            "list",
        ),
        (
            expr("os", "In", 1),
            f"{EXPR0}.values[0]",
            "string",
        ),
        (expr(5, "Exists"), f"{EXPR0}.key", "key"),
        (
            {"matchExpressions": [{"key": "os", "operator": "Exists", "extra": 1}]},
            EXPR0,
            "unknown",
        ),
        ({"matchLabels": {f"k{i}": "v" for i in range(selectors.MAX_LABELS + 1)}}, "target.matchLabels", "limit"),
        (
            {"matchExpressions": [{"key": "k", "operator": "Exists"}] * (selectors.MAX_EXPRESSIONS + 1)},
            "target.matchExpressions",
            "limit",
        ),
    ],
)
def test_invalid_targets_name_the_field(doc, field, fragment):
    with pytest.raises(errors.InvalidSpec) as info:
        selectors.parse_target(doc)
    assert info.value.field == field
    assert fragment in str(info.value)
    assert info.value.code == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("{", "not valid JSON"), ('{"matchLabels": {"a": NaN}}', "not valid JSON"), ("[1]", "must be an object")],
)
def test_invalid_target_json(text, fragment):
    with pytest.raises(errors.InvalidSpec, match=fragment):
        wire.target_from_json(text)


def test_empty_json_targets_everything():
    assert wire.target_from_json("").matches_everything
    assert wire.target_from_json("  ").matches(facts())


def test_document_is_normalised_so_equivalent_spellings_compare_equal():
    a = selectors.parse_target(
        {
            "matchLabels": {"b": "1", "a": "2"},
            "matchExpressions": [{"key": "t", "operator": "In", "values": ["y", "x"]}],
        }
    )
    b = selectors.parse_target(
        {
            "matchExpressions": [{"key": "t", "operator": "In", "values": ["x", "y"]}],
            "matchLabels": {"a": "2", "b": "1"},
        }
    )
    assert a.document == b.document
    assert selectors.parse_target({"matchLabels": {}, "matchExpressions": []}).document == {}
    assert selectors.parse_target(expr("k", "Exists")).document == expr("k", "Exists")
