#!/usr/bin/env python3
"""Print, one NAME=VALUE a line, the environment the chart gives a
component's container: the ConfigMap (envFrom), then its env list in order.
The pod name (downward API) becomes <workload>-0; Secret references get the
values passed as NAME=VALUE arguments after the component, which also
override other values (e.g. PARLEY_KAFKA_BROKERS to reach a local broker).
An argument naming a variable the container does not have is ignored, so
one list serves every component.

usage: podenv.py RENDERED.yaml COMPONENT [NAME=VALUE ...]
Used by helm/check.sh and helm/smoke-local.sh; needs PyYAML."""
import sys

import yaml

rendered, component, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
docs = [d for d in yaml.safe_load_all(open(rendered)) if d]
cm = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
pod = next(d for d in docs if d["kind"] in ("Deployment", "StatefulSet")
           and d["metadata"]["labels"]["app.kubernetes.io/component"] == component)
env = dict(cm)
for e in pod["spec"]["template"]["spec"]["containers"][0].get("env", []):
    if "value" in e:
        env[e["name"]] = e["value"]
    elif "fieldRef" in e.get("valueFrom", {}):
        env[e["name"]] = pod["metadata"]["name"] + "-0"
    else:
        env[e["name"]] = ""
for o in overrides:
    k, _, v = o.partition("=")
    if k in env:
        env[k] = v
missing = [k for k, v in env.items() if v == ""]
if missing:
    sys.exit(f"podenv: no value for {', '.join(missing)} (from a Secret): pass NAME=VALUE")
for k, v in env.items():
    print(f"{k}={v}")
