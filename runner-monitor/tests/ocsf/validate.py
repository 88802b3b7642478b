"""Validates OCSF events (JSON lines) against the OCSF schema, independently of runner-monitor.

usage: validate.py OCSF_VERSION FILE

ocsf-json-schema (PyPI) builds a JSON Schema (draft 2020-12, unknown fields refused, enums,
required fields and the at-least-one constraints) for each event's class from the OCSF schema
export it ships for that version; jsonschema (PyPI) checks every event against it. Prints each
error with its line and path, then "N events, E errors"; exits 1 on any error or no event.
"""
import json
import sys

from jsonschema import Draft202012Validator
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema

version, path = sys.argv[1], sys.argv[2]
schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=version))
validators = {}
events = errors = 0
with open(path) as lines:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        event = json.loads(line)
        events += 1
        name = schema.lookup_class_name_from_uid(class_uid=event["class_uid"])
        if name not in validators:
            validators[name] = Draft202012Validator(
                schema.get_class_schema(class_name=name, profiles=[])
            )
        for error in validators[name].iter_errors(event):
            errors += 1
            where = "/".join(map(str, error.absolute_path)) or "(top)"
            print(f"line {number}: {name}: {where}: {error.message[:400]}")
print(f"{events} events, {errors} errors")
sys.exit(1 if errors or not events else 0)
