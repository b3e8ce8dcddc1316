"""Request bodies checked by hand on the hot paths, each error naming the field that is wrong.

Owns the JSON parse, field types, join keys and client request ids of /get-online-features and /predict.
"""

from __future__ import annotations

from typing import Any

import orjson

from freshet.serving.errors import HTTPError

# A client's request id is a Kafka key and a join key in the monitor: bounded, printable
MAX_REQUEST_ID = 128


def parse_json(body: bytes) -> Any:
    """The JSON document of a request body; 400 naming `body` when it is empty or not JSON."""
    if not body:
        raise HTTPError(400, "the request body is empty; send a JSON object", "body")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(400, f"the request body is not valid JSON: {exc}", "body") from None


def expect(value: Any, kinds: type | tuple, field: str, what: str) -> Any:
    """`value` when it is one of `kinds`, else 422 naming `field`.

    >>> expect([1], list, "features", "a list")
    [1]
    >>> expect("x", list, "features", "a list of 'view:feature' strings")
    Traceback (most recent call last):
    ...
    freshet.serving.errors.HTTPError: must be a list of 'view:feature' strings, got a string
    """
    if not isinstance(value, kinds):
        raise HTTPError(422, f"must be {what}, got {json_type(value)}", field)
    return value


def json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def within_limit(count: int, limit: int | None, what: str, setting: str, field: str) -> None:
    """413 naming the limit and its setting when a request asks for more than `limit` (None: no limit).

    >>> within_limit(1001, 1000, "rows", "FRESHET_MAX_ROWS_PER_REQUEST", "instances")
    Traceback (most recent call last):
    ...
    freshet.serving.errors.HTTPError: 1001 rows exceed the limit of 1000 per request (FRESHET_MAX_ROWS_PER_REQUEST); split the request
    """
    if limit is not None and count > limit:
        raise HTTPError(413, f"{count} {what} exceed the limit of {limit} per request ({setting}); "
                             "split the request", field)


def features_request(body: bytes, max_rows: int | None = None,
                     max_features: int | None = None) -> tuple[list, str | None, bool, Any]:
    """(features, feature_service, full_feature_names, entities) of a /get-online-features body."""
    req = expect(parse_json(body), dict, "body", "a JSON object")
    features = req.get("features")
    features = [] if features is None else expect(features, list, "features", "a list of 'view:feature' strings")
    within_limit(len(features), max_features, "features", "FRESHET_MAX_FEATURES_PER_REQUEST", "features")
    service = req.get("feature_service")
    if service is not None:
        expect(service, str, "feature_service", "a string")
    full = expect(req.get("full_feature_names", False), bool, "full_feature_names", "true or false")
    if "entities" not in req:
        raise HTTPError(422, "missing; send {\"entities\": {\"<join key>\": [values...]}}", "entities")
    entities = req["entities"]
    if type(entities) is dict:
        rows = max((len(v) for v in entities.values() if type(v) is list), default=0)
        within_limit(rows, max_rows, "entity rows", "FRESHET_MAX_ROWS_PER_REQUEST", "entities")
    return features, service, full, entities


def predict_request(body: bytes, model_name: str, max_rows: int | None = None) -> tuple[list, bool]:
    """(instances, is it the batch form) of a /predict body for the served model `model_name`."""
    req = expect(parse_json(body), dict, "body", "a JSON object")
    wanted = req.get("model")
    if wanted is not None and wanted != model_name:
        raise HTTPError(404, f"model {wanted!r} is not served here; this server serves {model_name!r}", "model")
    batch = "instances" in req
    instances = expect(req["instances"], list, "instances", "a list of objects") if batch else [req]
    if not instances:
        raise HTTPError(422, "must hold at least one instance", "instances")
    within_limit(len(instances), max_rows, "instances", "FRESHET_MAX_ROWS_PER_REQUEST", "instances")
    if batch and "request_id" in req:
        raise HTTPError(422, "the batch form takes a request_id per instance, not one for the batch",
                        "request_id")
    return instances, batch


def parse_instances(instances: list, batch: bool, key_types: dict[str, str], fields: list[str],
                    model_name: str) -> tuple[dict[str, list], list[dict], list[str | None]]:
    """Join-key columns, request fields and client request ids of the instances, validated.

    `key_types` maps the join keys the model's features need to their Feast type, `fields`
    lists the inputs the request supplies. Field names for errors are built only on
    error: this runs for every prediction.
    """
    columns: dict[str, list] = {k: [] for k in key_types}
    key_types = list(key_types.items())
    fields_rows: list[dict] = []
    request_ids: list[str | None] = []
    first_with_id: dict[str, int] = {}

    def at(i: int, name: str) -> str:
        return f"instances[{i}].{name}" if batch else name

    for i, inst in enumerate(instances):
        if type(inst) is not dict:
            raise HTTPError(422, f"must be a JSON object, got {json_type(inst)}",
                            f"instances[{i}]" if batch else "body")
        rid = inst.get("request_id")
        if rid is not None:
            rid = client_request_id(inst, at(i, "request_id"))
            if rid in first_with_id:  # one id, two predictions: a label could join only one of them
                raise HTTPError(422, f"repeats the request_id of instances[{first_with_id[rid]}]",
                                at(i, "request_id"))
            first_with_id[rid] = i
        request_ids.append(rid)
        ents = inst.get("entities", {})
        if type(ents) is not dict:
            raise HTTPError(422, f"must be an object of join keys, got {json_type(ents)}", at(i, "entities"))
        for key, kind in key_types:
            v = ents.get(key)
            if v is None:
                raise HTTPError(422, f"missing; model {model_name!r} reads features keyed by {key!r}",
                                at(i, f"entities.{key}"))
            if not key_ok(v, kind):
                raise HTTPError(422, f"{v!r} is not a {kind.lower()}", at(i, f"entities.{key}"))
            columns[key].append(v)
        row = inst.get("fields", {})
        if type(row) is not dict:
            raise HTTPError(422, f"must be an object of request fields, got {json_type(row)}", at(i, "fields"))
        for name in fields:
            v = row.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise HTTPError(422, f"must be a number or null, got {json_type(v)}", at(i, f"fields.{name}"))
        fields_rows.append(row)
    return columns, fields_rows, request_ids


def client_request_id(inst: dict, field: str) -> str | None:
    """The request id a client sent with an instance (e.g. its transaction id), or None."""
    rid = inst.get("request_id")
    if rid is None:
        return None
    if not isinstance(rid, str):
        raise HTTPError(422, f"must be a string, got {json_type(rid)}", field)
    if not 0 < len(rid) <= MAX_REQUEST_ID:
        raise HTTPError(422, f"must be 1 to {MAX_REQUEST_ID} characters, got {len(rid)}", field)
    if not rid.isprintable():
        raise HTTPError(422, "must hold printable characters only", field)
    return rid


def key_ok(v: Any, kind: str) -> bool:
    """Whether a join key value has the type of the key's Feast type (other types are not checked)."""
    if kind == "STRING":
        return isinstance(v, str)
    if kind in ("INT64", "INT32", "UNIX_TIMESTAMP"):
        return isinstance(v, int) and not isinstance(v, bool)
    return True
