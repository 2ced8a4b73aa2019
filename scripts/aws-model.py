#!/usr/bin/env python3
"""Writes the constraints of the AWS KMS API model that hsm-kms checks requests against
(crates/server/src/api/aws/model.json) from the full model (../shared/reference/
aws-kms-api-model.json, or the path given): for each operation its input shape, and for each
shape its type, members (in the model's order), required members, length and range bounds,
enum values, pattern and whether it is sensitive. No documentation is kept.

    scripts/aws-model.py [path/to/aws-kms-api-model.json]

tests/... (api::aws::constraints) checks that the file is what this script writes.
"""
import json
import os
import sys

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
source = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    root, "..", "shared", "reference", "aws-kms-api-model.json")
model = json.load(open(source))
out = {"operations": {}, "shapes": {}}
for name, op in model["operations"].items():
    out["operations"][name] = op["input"]["shape"]
for name, shape in model["shapes"].items():
    if shape.get("exception"):
        continue
    s = {"type": shape["type"]}
    for k in ("required", "min", "max", "pattern", "enum", "sensitive"):
        if k in shape:
            s[k] = shape[k]
    if "members" in shape:
        s["members"] = [[m, v["shape"]] for m, v in shape["members"].items()]
    if "member" in shape:
        s["member"] = shape["member"]["shape"]
    if "key" in shape:
        s["key"] = shape["key"]["shape"]
        s["value"] = shape["value"]["shape"]
    out["shapes"][name] = s
path = os.path.join(root, "crates", "server", "src", "api", "aws", "model.json")
with open(path, "w") as f:
    json.dump(out, f, indent=0, separators=(",", ":"))
    f.write("\n")
print(f"wrote {path}: {len(out['operations'])} operations, {len(out['shapes'])} shapes")
