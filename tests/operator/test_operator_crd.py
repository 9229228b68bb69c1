"""The CRD is generated from the typed model: structural, described, and committed up to date."""

from __future__ import annotations

import pathlib
import subprocess
import sys
from typing import Any

import pytest
import yaml

from tether.operator import crd, model, task_status

ROOT = pathlib.Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "charts" / "tether" / "crds" / "mltask.yaml"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return crd.build()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_the_committed_crd_is_fresh() -> None:
    """Fails when model.py changed without `python -m tether.operator.crd`."""
    assert COMMITTED.read_text(encoding="utf-8") == crd.render(), "run: python -m tether.operator.crd"


def test_check_mode_passes_on_the_committed_file_and_fails_on_a_stale_one(tmp_path: pathlib.Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "tether.operator.crd", "--check", "--output", str(COMMITTED)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    stale = tmp_path / "mltask.yaml"
    stale.write_text(crd.render().replace("Percents must increase", "Percents may do anything"), encoding="utf-8")
    bad = subprocess.run(
        [sys.executable, "-m", "tether.operator.crd", "--check", "--output", str(stale)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode == 1
    assert "is stale" in bad.stderr and "Percents may do anything" in bad.stderr


def test_identity_of_the_resource() -> None:
    doc = yaml.safe_load(COMMITTED.read_text(encoding="utf-8"))
    assert doc["apiVersion"] == "apiextensions.k8s.io/v1" and doc["kind"] == "CustomResourceDefinition"
    assert doc["metadata"]["name"] == "mltasks.tether.dev"
    spec = doc["spec"]
    assert spec["group"] == "tether.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "MLTask" and spec["names"]["plural"] == "mltasks"
    assert spec["names"]["shortNames"] == ["mlt"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Stage", "Targeted", "Installed", "Succeeded", "Failed", "Round", "Age"]
    assert columns["Round"]["jsonPath"] == ".status.federated.round"
    assert columns["Phase"]["jsonPath"] == ".status.phase"
    assert columns["Age"]["type"] == "date"


def test_every_field_has_a_type_and_a_description(schema: dict[str, Any]) -> None:
    missing = [path for path, sub in crd.iter_properties(schema) if not sub.get("description")]
    assert missing == []
    untyped = [path for path, sub in crd.iter_properties(schema) if "type" not in sub]
    assert untyped == []


FORBIDDEN = {"$ref", "$defs", "title", "anyOf", "oneOf", "allOf", "const", "discriminator"}


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from _walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}/{i}")


def test_the_schema_is_structural(schema: dict[str, Any]) -> None:
    for path, node in _walk(schema):
        if "/enum" in path or path.endswith("/required") or "/x-kubernetes" in path:
            continue
        if "/properties/" in path and path.rsplit("/", 2)[-2] == "properties":
            assert not (FORBIDDEN & set(node)), f"{path}: {sorted(FORBIDDEN & set(node))}"
            # properties and additionalProperties are mutually exclusive in a structural schema
            assert not ("properties" in node and "additionalProperties" in node), path
            assert node.get("default", 0) is not None, path


def test_the_schema_carries_enums_bounds_and_patterns(schema: dict[str, Any]) -> None:
    spec = schema["properties"]["spec"]
    assert spec["required"] == ["bundle"]
    assert spec["properties"]["bundle"]["properties"]["digest"]["pattern"] == model.DIGEST_PATTERN
    assert spec["properties"]["trigger"]["properties"]["type"]["enum"] == [
        "onInstall",
        "interval",
        "cron",
        "onDemand",
        "pattern",
    ]
    where = spec["properties"]["trigger"]["properties"]["pattern"]["properties"]["steps"]["items"]["properties"]
    assert where["where"]["x-kubernetes-preserve-unknown-fields"] is True  # free-form conditions survive pruning
    interval = spec["properties"]["trigger"]["properties"]["intervalSeconds"]
    assert interval["type"] == "integer" and interval["nullable"] is True and interval["minimum"] == 1
    stage = spec["properties"]["rollout"]["properties"]["stages"]["items"]["properties"]["percent"]
    assert (stage["minimum"], stage["maximum"]) == (1, 100)
    expr = spec["properties"]["target"]["properties"]["matchExpressions"]["items"]
    assert expr["properties"]["operator"]["enum"] == ["In", "NotIn", "Exists", "DoesNotExist"]
    assert spec["properties"]["aggregation"]["properties"]["counts"]["enum"] == ["sum"]
    labels = spec["properties"]["target"]["properties"]["matchLabels"]
    assert labels["type"] == "object" and labels["additionalProperties"]["type"] == "string"
    assert spec["properties"]["resources"]["properties"]["memoryMB"]["minimum"] == 16


def test_the_status_schema(schema: dict[str, Any]) -> None:
    status = schema["properties"]["status"]["properties"]
    assert status["phase"]["enum"] == [p.value for p in task_status.Phase]
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["items"]["required"] == ["type", "status", "reason", "lastTransitionTime"]
    assert conditions["items"]["properties"]["lastTransitionTime"]["format"] == "date-time"
    assert set(status["aggregate"]["properties"]) == {"round", "results", "samples", "metrics"}
    for name in ("targeted", "notified", "installed", "succeeded", "failed", "refused", "results"):
        assert status[name]["type"] == "integer"


def test_structural_conversion_rejects_what_it_cannot_express() -> None:
    with pytest.raises(crd.SchemaError):
        crd.structural({"type": "object", "properties": {"x": {"anyOf": [{"type": "string"}, {"type": "integer"}]}}})
    with pytest.raises(crd.SchemaError):
        crd.structural({"type": "object", "properties": {"x": {"$ref": "#/$defs/Nope"}}})
    with pytest.raises(crd.SchemaError):
        crd.structural({"type": "object", "properties": {"x": {"description": "no type"}}})


def test_the_example_mltasks_validate_against_the_model() -> None:
    from tether.operator import validate

    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict) and doc.get("kind") == model.KIND:
                spec = dict(doc["spec"])
                if "REPLACE" in spec["bundle"]["digest"]:  # a placeholder for the printed digest
                    spec["bundle"] = {"digest": "sha256:" + "0" * 64}
                validate.validate(spec)
