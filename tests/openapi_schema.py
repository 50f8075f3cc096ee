"""OpenAPI component schemas as JSON Schema, for the client tests that validate our answers
against TEI's and TGI's own OpenAPI documents (tests/tei_client.py, tests/hf_clients.py)."""
import copy


def component_schema(spec, name):
    """`spec`'s component `name` as JSON Schema: `$ref`s inlined, OpenAPI's `nullable` as a
    null type, `example` and `discriminator` (annotations JSON Schema does not know) dropped."""
    schemas = spec["components"]["schemas"]

    def fix(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return fix(copy.deepcopy(schemas[node["$ref"].split("/")[-1]]))
            node = {k: fix(v) for k, v in node.items() if k not in ("example", "discriminator")}
            if node.pop("nullable", False):
                node = {"anyOf": [node, {"type": "null"}]}
            return node
        if isinstance(node, list):
            return [fix(x) for x in node]
        return node
    return fix(copy.deepcopy(schemas[name]))
