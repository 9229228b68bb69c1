"""Generate the MLTask CustomResourceDefinition from the typed models.

`model.py` is the single source of the resource's shape; this module turns
its JSON schema into a *structural* OpenAPI v3 schema that an API server
accepts (https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/
custom-resource-definitions/#specifying-a-structural-schema):
every `$ref` inlined, no titles, `anyOf [X, null]` turned into `X` with
`nullable: true`, `const` into a one-value `enum`, no `additionalProperties:
false` beside `properties` (the API server prunes unknown fields instead),
and every property with a type and a description.

    python -m tether.operator.crd            # (re)write charts/tether/crds/mltask.yaml
    python -m tether.operator.crd --check    # exit 1 if the committed file is stale
    python -m tether.operator.crd --stdout   # print it

Pure apart from `main`.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import yaml

from tether.operator import model, task_status

CRD_NAME = f"{model.PLURAL}.{model.GROUP}"
HEADER = "# Generated from tether.operator.model by `python -m tether.operator.crd`. Do not edit.\n"
# Keywords a structural schema may carry that we keep from pydantic's output.
_KEPT = {
    "type",
    "description",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "enum",
    "default",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "minProperties",
    "maxProperties",
    "format",
    "nullable",
}


class SchemaError(Exception):
    """The models produced a schema that cannot be made structural."""


def structural(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema (with `$defs`) as a structural OpenAPI v3 schema."""
    defs = schema.get("$defs", {})
    return _convert(schema, defs, path="")


def _convert(node: dict[str, Any], defs: dict[str, Any], *, path: str) -> dict[str, Any]:
    node = dict(node)
    node.pop("$defs", None)
    nullable = False

    # Inline references; the referring node's own keywords (its description) win.
    while "$ref" in node:
        ref = node.pop("$ref")
        name = ref.rsplit("/", 1)[-1]
        if name not in defs:
            raise SchemaError(f"{path or '/'}: unresolved $ref {ref!r}")
        node = {**copy.deepcopy(defs[name]), **node}
    # Optional[X] -> X, nullable.
    for key in ("anyOf", "oneOf"):
        if key in node:
            alternatives = node.pop(key)
            options = [o for o in alternatives if o.get("type") != "null"]
            nullable = nullable or len(options) < len(alternatives)
            if len(options) != 1:
                raise SchemaError(f"{path or '/'}: {key} of several non-null types is not structural")
            inner = _convert(options[0], defs, path=path)
            node = {**inner, **node}
    if "allOf" in node:
        parts = node.pop("allOf")
        if len(parts) != 1:
            raise SchemaError(f"{path or '/'}: allOf of several schemas is not supported")
        node = {**_convert(parts[0], defs, path=path), **node}
    if "const" in node:
        node["enum"] = [node.pop("const")]
    # JSON Schema's numeric exclusive bounds are OpenAPI v3.0 booleans beside minimum/maximum: the
    # API server refuses a CRD with `exclusiveMinimum: 0`.
    for exclusive, bound in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(exclusive), (int, float)) and not isinstance(node[exclusive], bool):
            node = {**node, bound: node[exclusive], exclusive: True}

    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: _convert(sub, defs, path=f"{path}.{name}") for name, sub in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs, path=f"{path}[]")
        elif key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = _convert(value, defs, path=f"{path}.*")
            # `false` is dropped: not allowed beside `properties`; the API server prunes unknown fields.
        elif key == "default":
            if value is not None and not isinstance(value, (dict, list)):
                out[key] = value
        elif key in _KEPT or key.startswith("x-kubernetes-"):
            out[key] = value
    if nullable or node.get("default", 0) is None:
        out["nullable"] = True
    if "type" not in out:
        raise SchemaError(f"{path or '/'}: no type")
    if out.get("required") == []:
        del out["required"]
    return {key: out[key] for key in sorted(out, key=_key_order)}


def _key_order(key: str) -> tuple[int, str]:
    # Readable YAML: what a node is first, its children last.
    first, last = ("type", "description"), ("required", "properties", "items", "additionalProperties")
    if key in first:
        return (0, str(first.index(key)))
    if key in last:
        return (2, str(last.index(key)))
    return (1, key)


def _root_schema() -> dict[str, Any]:
    spec = structural(model.MLTaskSpec.model_json_schema(by_alias=True))
    status = structural(task_status.MLTaskStatus.model_json_schema(by_alias=True))
    return {
        "type": "object",
        "description": f"{model.KIND}: an ML task rolled out to edge devices, run there, and aggregated in the cloud.",
        "properties": {
            "apiVersion": {"type": "string", "description": "The versioned schema of this object."},
            "kind": {"type": "string", "description": "The REST resource this object represents."},
            "metadata": {"type": "object", "description": "Standard object metadata."},
            "spec": spec,
            "status": status,
        },
        "required": ["spec"],
    }


def build() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/part-of": "tether"},
        },
        "spec": {
            "group": model.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": model.KIND,
                "listKind": f"{model.KIND}List",
                "plural": model.PLURAL,
                "singular": model.SINGULAR,
                "shortNames": list(model.SHORT_NAMES),
                "categories": ["tether"],
            },
            "versions": [
                {
                    "name": model.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [dict(c) for c in model.PRINTER_COLUMNS],
                    "schema": {"openAPIV3Schema": _root_schema()},
                }
            ],
        },
    }


def render() -> str:
    return HEADER + yaml.safe_dump(build(), sort_keys=False, width=100, allow_unicode=True)


def iter_properties(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (path, schema) below `schema`, for checks such as "every field has a description"."""
    for name, sub in schema.get("properties", {}).items():
        yield f"{path}.{name}", sub
        yield from iter_properties(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from iter_properties(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from iter_properties(schema["additionalProperties"], f"{path}.*")


def default_path() -> pathlib.Path:
    """charts/tether/crds/mltask.yaml of the source checkout this module lives in."""
    here = pathlib.Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "charts" / "tether").is_dir():
            return parent / "charts" / "tether" / "crds" / "mltask.yaml"
    return pathlib.Path.cwd() / "charts" / "tether" / "crds" / "mltask.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tether.operator.crd", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file differs from a fresh generation")
    parser.add_argument("--stdout", action="store_true", help="print the CRD instead of writing it")
    parser.add_argument("--output", type=pathlib.Path, default=None, help="where the CRD YAML lives")
    args = parser.parse_args(argv)
    text = render()
    if args.stdout:
        sys.stdout.write(text)
        return 0
    path = args.output or default_path()
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            sys.stderr.writelines(
                difflib.unified_diff(
                    current.splitlines(keepends=True), text.splitlines(keepends=True), str(path), "generated"
                )
            )
            sys.stderr.write(f"{path} is stale: run `python -m tether.operator.crd`\n")
            return 1
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
