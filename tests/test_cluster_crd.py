"""The KubeRay manifests against the RayCluster and RayJob CRD schemas.

The schemas are KubeRay's own (``openAPIV3Schema`` of the served version in
``ray-operator/config/crd/bases``), kept as test data in ``tests/data/cluster``. Kubernetes prunes
fields a schema does not know without a word, so a misspelt key would be lost at
``kubectl apply``; here every object with ``properties`` refuses unknown keys, except where the
schema says ``x-kubernetes-preserve-unknown-fields``.
"""
from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMAS = REPO / "tests" / "data" / "cluster" / "kuberay-crd-schemas.json.gz"
MANIFESTS = [REPO / "cluster" / "kuberay" / "raycluster.yaml",
             REPO / "cluster" / "kuberay" / "rayjob.yaml"]


def strict(schema):
    """The schema with ``additionalProperties: false`` wherever it lists ``properties``."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crds() -> dict:
    with gzip.open(SCHEMAS) as f:
        return json.load(f)["schemas"]


def ray_documents():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") in ("RayCluster", "RayJob"):
                yield path, doc


def errors(doc: dict, crds: dict) -> list[str]:
    crd = crds[doc["kind"]]
    validator = jsonschema.Draft7Validator(strict(crd["schema"]))
    found = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
             for e in validator.iter_errors(doc)]
    if doc["apiVersion"] != crd["apiVersion"]:
        found.append(f"apiVersion {doc['apiVersion']} is not the served {crd['apiVersion']}")
    return found


def test_both_manifests_hold_a_ray_resource():
    kinds = sorted(doc["kind"] for _, doc in ray_documents())
    assert kinds == ["RayCluster", "RayJob"]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_each_manifest_is_valid_against_its_crd(path, crds):
    for doc_path, doc in ray_documents():
        if doc_path == path:
            assert errors(doc, crds) == []


def test_a_misspelt_key_would_be_caught(crds):
    _, doc = next(ray_documents())
    broken = copy.deepcopy(doc)
    spec = broken["spec"].get("rayClusterSpec", broken["spec"])
    spec["headGroupSpec"]["rayStartParam"] = spec["headGroupSpec"].pop("rayStartParams", {})
    assert any("rayStartParam" in e for e in errors(broken, crds))
    wrong_type = copy.deepcopy(doc)
    groups = wrong_type["spec"].get("rayClusterSpec", wrong_type["spec"])["workerGroupSpecs"]
    groups[0]["replicas"] = "two"
    assert any("replicas" in e for e in errors(wrong_type, crds))
