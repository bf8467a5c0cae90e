"""The deployment files under cloud/deploy/ are valid: the Serve config against Ray Serve's schema (and its
application builds), the Kubernetes manifests against the Kubernetes 1.30 schemas (kubernetes-validate, strict:
an unknown field fails), the RayService's embedded Serve config against the same schema as serve.yaml, and the
fronts' cloud.yaml against the cloud's config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "cloud" / "deploy"
K8S_VERSION = "1.30.0"


def _serve_schema():
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema


def test_serve_config_is_valid_and_builds_the_stages():
    schema = _serve_schema()
    cfg = schema.model_validate(yaml.safe_load((DEPLOY / "serve.yaml").read_text()))
    (app,) = cfg.applications
    from latentcast.cloud.serve_stages import APP_NAME, app_builder

    assert app.name == APP_NAME and app.route_prefix is None
    module, _, attr = app.import_path.partition(":")
    assert f"{module}:{attr}" == "latentcast.cloud.serve_stages:app_builder"
    built = app_builder(app.args)
    from ray.serve.deployment import Application

    assert isinstance(built, Application)


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / "k8s" / name).read_text()) if d]


def test_front_manifests_are_valid_kubernetes():
    kv = pytest.importorskip("kubernetes_validate")
    docs = _docs("fronts.yaml")
    assert [d["kind"] for d in docs] == ["ConfigMap", "Service", "StatefulSet"]
    for d in docs:
        kv.validate(d, K8S_VERSION, strict=True)
    bad = dict(docs[2], spec=dict(docs[2]["spec"], replicaz=3))  # a typo must fail
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_fronts_cloud_config_points_at_the_rayservice(tmp_path):
    from latentcast.cloud.config import load_cloud_config

    cm = _docs("fronts.yaml")[0]
    p = tmp_path / "cloud.yaml"
    p.write_text(cm["data"]["cloud.yaml"])
    cfg = load_cloud_config(p)
    (rs,) = _docs("rayservice.yaml")
    assert cfg.pipeline.engine == "ray"
    assert cfg.pipeline.ray_address == f"ray://{rs['metadata']['name']}-head-svc:10001"  # KubeRay's head service
    assert cfg.server.exposure_problem() is None  # 0.0.0.0 with TLS and tokens
    sts = _docs("fronts.yaml")[2]
    assert sts["spec"]["serviceName"] == _docs("fronts.yaml")[1]["metadata"]["name"]


def test_rayservice_embeds_the_serve_config():
    schema = _serve_schema()
    (rs,) = _docs("rayservice.yaml")
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    embedded = schema.model_validate(yaml.safe_load(rs["spec"]["serveConfigV2"]))
    shipped = schema.model_validate(yaml.safe_load((DEPLOY / "serve.yaml").read_text()))
    e, s = embedded.applications[0], shipped.applications[0]
    assert (e.name, e.import_path, e.route_prefix) == (s.name, s.import_path, s.route_prefix)
    assert e.args["config"] == "/etc/latentcast/cloud.yaml"  # where the ConfigMap is mounted
    cluster = rs["spec"]["rayClusterConfig"]
    for c in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        (container,) = c["template"]["spec"]["containers"]
        assert any(m["mountPath"] == "/etc/latentcast" for m in container["volumeMounts"])
    kv = pytest.importorskip("kubernetes_validate")  # the pod templates are core objects: check them too
    for c in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                     "template": c["template"]}, K8S_VERSION, strict=True)
