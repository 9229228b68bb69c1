"""Hypothesis strategies for the fuzzers: arbitrary JSON and near-valid manifests and MLTask documents.

Near-valid inputs matter more than random ones: a random document is refused
at its first field, a near-valid one reaches the checks across fields.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hypothesis import strategies as st

from tether.common import manifest

# Scalars that break naive parsers: huge and negative integers, bools where ints go, odd floats, odd text.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
    st.sampled_from(["", " ", "\x00", "a" * 300, "é", "e\u0301", "..", "/", ".tether", "sha256:", "In", "NotIn"]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)

DIGESTS = [manifest.sha256_digest(bytes([i])) for i in range(4)]
PATH_PARTS = st.sampled_from(["a", "A", "b", "task.py", "model.mnn", "x.", "e\u0301", "é", ".tether", "w" * 256, "d"])
PATHS = st.one_of(st.lists(PATH_PARTS, min_size=1, max_size=4).map("/".join), st.text(max_size=30))


@st.composite
def manifest_docs(draw: st.DrawFn) -> Any:
    """A manifest document: mostly well-formed, with one or more parts drawn wild."""
    paths = draw(st.lists(PATHS, min_size=1, max_size=6, unique=True))
    if draw(st.booleans()):
        paths = sorted(paths)
    files: list[Any] = [
        {
            "path": p,
            "sha256": draw(st.sampled_from(DIGESTS) | st.text(max_size=70)),
            "size": draw(st.integers(min_value=-1, max_value=manifest.MAX_FILE_SIZE + 1)),
        }
        for p in paths
    ]
    if draw(st.integers(0, 4)) == 0:
        files.append(draw(JSON))
    doc: dict[str, Any] = {
        "schema": draw(st.just(manifest.SCHEMA_VERSION) | JSON),
        "name": draw(st.sampled_from(["t", "digits-eval", "T", "a" * 129, ""]) | st.text(max_size=10)),
        "entrypoint": draw(st.sampled_from(paths) | PATHS),
        "files": draw(st.just(files) | JSON),
    }
    if draw(st.booleans()):
        engine = {
            "engine": draw(st.sampled_from(["mnn", "onnxruntime"]) | JSON),
            "model": draw(st.sampled_from(paths) | PATHS),
            "inputs": draw(st.dictionaries(st.text(max_size=5), st.lists(JSON, max_size=3), max_size=2) | JSON),
        }
        doc["engines"] = draw(st.just([engine]) | JSON)
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.text(max_size=8))] = draw(JSON)
    return doc


def manifest_bytes() -> st.SearchStrategy[bytes]:
    """Bytes a controller or agent might be handed as a manifest."""
    return st.one_of(
        manifest_docs().map(manifest.canonical_json),
        manifest_docs().map(lambda d: json.dumps(d).encode()),
        st.binary(max_size=300),
        st.integers(min_value=1, max_value=5_000).map(lambda n: b"[" * n + b"]" * n),  # nesting (the limit is ~1000)
        st.integers(min_value=1, max_value=6_000).map(lambda n: b'{"schema":' + b"9" * n + b"}"),  # digits (limit 4300)
    )


# ---------------------------------------------------------------- MLTask documents

LABEL_KEYS = st.sampled_from(["os", "app", "tether.io/tier", "example.com/x", "k" * 64, "bad key", "", "a/b/c"])
LABEL_VALUES = st.sampled_from(["android", "ios", "", "v" * 64, "-x", "a b"]) | st.text(max_size=8)


@st.composite
def selector_docs(draw: st.DrawFn) -> Any:
    doc: dict[str, Any] = {}
    if draw(st.booleans()):
        doc["matchLabels"] = draw(st.dictionaries(LABEL_KEYS, LABEL_VALUES, max_size=3) | JSON)
    if draw(st.booleans()):
        doc["matchExpressions"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "key": LABEL_KEYS,
                        "operator": st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist", "Near"]) | JSON,
                        "values": st.lists(LABEL_VALUES, max_size=3) | JSON,
                    }
                ),
                max_size=3,
            )
            | JSON
        )
    if draw(st.booleans()):
        doc["matchVersions"] = draw(
            st.dictionaries(LABEL_KEYS, st.sampled_from([">=10.2,<11", "==1", "<1,>2", "~1", "", ">=x"]), max_size=2)
            | JSON
        )
    if draw(st.integers(0, 3)) == 0:
        doc["deviceIds"] = draw(st.lists(st.text(max_size=12), max_size=3) | JSON)
    return doc


TRIGGERS = st.one_of(
    st.fixed_dictionaries({"type": st.just("onInstall")}),
    st.fixed_dictionaries({"type": st.just("interval"), "seconds": st.integers(-5, 40_000_000) | JSON}),
    st.fixed_dictionaries({"type": st.just("cron"), "schedule": st.sampled_from(["*/5 * * * *", "61 * * * *"]) | JSON}),
    st.fixed_dictionaries(
        {"type": st.just("onInstall"), "conditions": st.dictionaries(st.sampled_from(["charging", "idle", "x"]), JSON)}
    ),
    st.dictionaries(st.sampled_from(["type", "seconds", "schedule", "pattern", "window"]), JSON, max_size=3),
)
RESOURCES = st.dictionaries(
    st.sampled_from(["timeoutSeconds", "memoryMB", "cpuSeconds", "gpus"]),
    st.integers(-5, 100_000) | JSON,
    max_size=3,
)


@st.composite
def stage_docs(draw: st.DrawFn) -> Any:
    stage: dict[str, Any] = {}
    kind = draw(st.sampled_from(["percent", "count", "cohort", "both", "none"]))
    if kind in ("percent", "both"):
        stage["percent"] = draw(st.integers(-1, 101) | JSON)
    if kind in ("count", "both"):
        stage["count"] = draw(st.integers(-1, 10**9) | JSON)
    if kind == "cohort" or draw(st.integers(0, 4)) == 0:
        stage["cohort"] = draw(selector_docs())
    if draw(st.booleans()):
        stage["gates"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {
                        "metric": st.sampled_from(
                            ["devicesReporting", "successRate", "errorRate", "notReporting", "notReportingRate"]
                        )
                        | st.text(max_size=10).map(lambda t: "task." + t),
                    },
                    optional={"min": st.floats(-2, 200, allow_nan=False), "max": st.floats(-2, 200, allow_nan=False)},
                ),
                max_size=3,
            )
        )
    if draw(st.integers(0, 3)) == 0:
        stage["bakeSeconds"] = draw(st.integers(-1, 10**8) | JSON)
    if draw(st.integers(0, 5)) == 0:
        stage["name"] = draw(st.sampled_from(["beta", "Beta", "", "-x"]) | st.text(max_size=70))
    return stage


@st.composite
def mltask_specs(draw: st.DrawFn) -> Any:
    """An MLTask `spec`: the bundle always well-formed (its digest shape is not what is fuzzed), the rest wild."""
    doc: dict[str, Any] = {"bundle": {"digest": "sha256:" + hashlib.sha256(b"b").hexdigest()}}
    if draw(st.booleans()):
        target = draw(selector_docs())
        if draw(st.integers(0, 3)) == 0:
            target["exclude"] = draw(st.lists(selector_docs(), max_size=2))
        doc["target"] = target
    if draw(st.booleans()):
        doc["trigger"] = draw(TRIGGERS)
    if draw(st.booleans()):
        doc["resources"] = draw(RESOURCES)
    if draw(st.booleans()):
        rollout: dict[str, Any] = {"stages": draw(st.lists(stage_docs(), min_size=1, max_size=4))}
        if draw(st.booleans()):
            rollout["stages"][-1] = {**rollout["stages"][-1], "percent": 100}
            rollout["stages"][-1].pop("count", None)
        if draw(st.integers(0, 3)) == 0:
            rollout["reportDeadlineSeconds"] = draw(st.integers(-1, 10**7) | JSON)
        if draw(st.integers(0, 3)) == 0:
            rollout["salt"] = draw(st.text(max_size=140))
        doc["rollout"] = rollout
    if draw(st.integers(0, 9)) == 0:
        doc[draw(st.text(max_size=8))] = draw(JSON)
    return doc


def wire_documents() -> st.SearchStrategy[str]:
    """Text a ReleaseSpec's JSON fields may carry: near-valid documents, arbitrary JSON, broken text."""
    docs = st.one_of(selector_docs(), TRIGGERS, RESOURCES, JSON)
    return st.one_of(
        docs.map(json.dumps),
        st.text(max_size=60),
        st.integers(min_value=1, max_value=5_000).map(lambda n: "[" * n + "]" * n),
        st.integers(min_value=1, max_value=6_000).map(lambda n: '{"x":' + "7" * n + "}"),
        st.sampled_from(["", "{}", "null", "NaN", '{"a": Infinity}', "[]", '"x"']),
    )
