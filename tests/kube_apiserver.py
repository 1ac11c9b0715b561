"""A stand-in Kubernetes API server for tests: the endpoints wattops calls, over real HTTP.

No kube-apiserver can run where wattops' tests run, so this module serves, on loopback, the
parts of the API that wattops drives through the official `kubernetes` Python client, and a
stand-in deployment controller behind them. Each part copies an observable behaviour of the
real server; the sources are the Kubernetes API concepts
(https://kubernetes.io/docs/reference/using-api/api-concepts/), the API conventions
(https://github.com/kubernetes/community/blob/master/contributors/devel/sig-architecture/api-conventions.md)
and the code named below (kubernetes/kubernetes).

- Objects, lists and resourceVersion (API concepts, "Resource versions"; conventions,
  "Concurrency Control and Consistency"): objects are the JSON the real server returns. One
  counter serves as the resourceVersion of every write, as etcd's revision does; a list
  carries it in `metadata.resourceVersion` and its items have no kind/apiVersion. A write
  that changes nothing keeps the old resourceVersion (storage skips no-op updates). Spec
  (and annotation) changes of a Deployment bump `metadata.generation`
  (pkg/registry/apps/deployment/strategy.go); writes through the main resource cannot change
  status. Zero counts are left out of a Deployment's status and a Scale's spec, as their
  `omitempty` int32 fields are.
- Selectors (https://kubernetes.io/docs/concepts/overview/working-with-objects/labels/ and
  .../field-selectors/): label selectors with `=`, `==`, `!=`, `in`, `notin`, `key`, `!key`
  ANDed by commas; field selectors on the fields the real server indexes for pods and
  deployments, anything else a 400 "field label not supported".
- Watch (API concepts, "Efficient detection of changes"): a list with `watch=true` streams
  newline-delimited `{"type", "object"}` events. Without a resourceVersion (or with "0") it
  first sends ADDED for every current object, else it replays what happened after the given
  version; `timeoutSeconds` ends the stream. With a selector, an object that stops or starts
  matching arrives as DELETED or ADDED, as the watch cache sends it.
- Errors are metav1.Status objects with the real messages
  (k8s.io/apimachinery/pkg/api/errors/errors.go): NotFound `deployments.apps "NAME" not
  found`, Conflict `Operation cannot be fulfilled on deployments.apps "NAME": the object has
  been modified; ...`, Invalid `Deployment.apps "NAME" is invalid: spec.replicas: ...`.
- Optimistic concurrency (conventions, "Concurrency Control and Consistency"): a PUT or a
  PATCH whose object carries a resourceVersion other than the current one gets 409 Conflict;
  without one the write is unconditional (Deployments allow unconditional updates).
- PATCH (API concepts, "Patch and apply"; handlers/patch.go): the three JSON patch types.
  Strategic merge patch (https://github.com/kubernetes/community/blob/master/contributors/
  devel/sig-api-machinery/strategic-merge-patch.md) merges lists that declare a
  patchMergeKey (containers and env by `name`, ...), honours `$patch: delete|replace`,
  replaces other lists and deletes a key set to null. JSON merge patch (RFC 7386) replaces
  lists whole. JSON patch (RFC 6902) applies add/remove/replace/move/copy/test; one that does
  not apply (a failed `test`) is a 422. Any other Content-Type is a 415 listing the accepted
  ones, as `negotiation.NewUnsupportedMediaTypeError` does.
- The scale subresource (pkg/registry/apps/deployment/storage/storage.go, ScaleREST): an
  autoscaling/v1 Scale carrying the Deployment's resourceVersion and its selector as a
  string; a write sets the Deployment's spec.replicas; negative replicas are a 422 on
  `Scale.autoscaling`.
- Authentication and RBAC (https://kubernetes.io/docs/reference/access-authn-authz/rbac/ and
  authorization/#determine-the-request-verb): bearer tokens map to users (401 for a missing
  or unknown token, as a server with `--anonymous-auth=false`); users are bound to
  ClusterRoles, cluster-wide or in one namespace; the verb is get/list/watch/patch/update as
  the request-info factory derives it; a refusal is a 403 whose message is built as
  responsewriters/errors.go builds it.
- The deployment controller (pkg/controller/deployment/{rolling,sync,progress}.go, and
  https://kubernetes.io/docs/concepts/workloads/controllers/deployment/): a changed pod
  template (by a pod-template-hash) gets a new ReplicaSet, or reuses the old one on a
  rollback; a rolling update scales the new ReplicaSet up within maxSurge (rounded up) and
  the old ones down within maxUnavailable (rounded down), unhealthy old pods first; Recreate
  removes the old pods before making new ones. Status follows calculateStatus and
  syncRolloutStatus, with the Available and Progressing conditions and their reasons
  (NewReplicaSetCreated, FoundNewReplicaSet, ReplicaSetUpdated, NewReplicaSetAvailable, and
  ProgressDeadlineExceeded once progressDeadlineSeconds pass without progress).
- Pods of a Deployment are pod objects (labels = template labels + pod-template-hash, owned
  by the ReplicaSet) placed round-robin on `nodes`. A pod becomes Running and Ready
  `ready_after_s` after creation; one whose template matches `crash_when` instead crash-loops
  (waiting reason CrashLoopBackOff, restartCount rising every `ready_after_s`, where the
  kubelet backs off 10 s, 20 s, ... up to 5 min). Scale-down deletes unready pods first.

- Create and delete of Deployments (handlers/create.go, handlers/delete.go): a POST to the
  collection is a 201 with the stored object (AlreadyExists 409 `deployments.apps "NAME"
  already exists`; a body naming another namespace is a 400); a DELETE answers the Success
  Status with the object's uid in its details, as the default (background) propagation does,
  and the garbage collector then removes its ReplicaSets' pods.

Not copied: ReplicaSets are not served; pods cannot be created or deleted through the API
(405), only with the helpers; pods end at once instead of Terminating;
minReadySeconds, paused deployments, proportional scaling during a rollout, history cleanup,
server-side apply (415), `$setElementOrder`/`$retainKeys` and primitive-list merges, list
pagination, bookmarks, and 410 Gone for a watch from a compacted version.
"""

from __future__ import annotations

import asyncio
import bisect
import copy
import hashlib
import json
import math
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import kubernetes.client
from aiohttp import web

Json = dict[str, Any]
Matcher = Callable[[Json], bool]


def _dumps(obj: Any) -> str:
    """JSON as the real server writes it (Go's encoding/json): compact."""
    return json.dumps(obj, separators=(",", ":"))


VIEWER_TOKEN = "wattops-viewer-token"
OPERATOR_TOKEN = "wattops-operator-token"

JSON_PATCH = "application/json-patch+json"
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"
PATCH_CONTENT_TYPES = (JSON_PATCH, MERGE_PATCH, STRATEGIC_MERGE_PATCH)

REVISION_ANNOTATION = "deployment.kubernetes.io/revision"

# The alphabet of the real server's SafeEncodeString (k8s.io/apimachinery/pkg/util/rand): no
# vowels, so generated names never spell words.
_NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

# Lists whose Go field declares `patchStrategy:"merge"`, by their path (list indexes left out)
# in a Deployment, with the patchMergeKey (k8s.io/api/core/v1/types.go).
_MERGE_KEYS: dict[tuple[str, ...], str] = {
    ("spec", "template", "spec", "containers"): "name",
    ("spec", "template", "spec", "containers", "env"): "name",
    ("spec", "template", "spec", "containers", "ports"): "containerPort",
    ("spec", "template", "spec", "containers", "volumeMounts"): "mountPath",
    ("spec", "template", "spec", "initContainers"): "name",
    ("spec", "template", "spec", "initContainers", "env"): "name",
    ("spec", "template", "spec", "volumes"): "name",
    ("spec", "template", "spec", "imagePullSecrets"): "name",
}

# The field selectors the real server accepts (pkg/registry/core/pod/strategy.go and the
# generic metadata fields for deployments).
_SELECTABLE_FIELDS = {
    "pods": {
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    },
    "deployments": {"metadata.name", "metadata.namespace"},
}


@dataclass(frozen=True)
class _Kind:
    """How a resource is named in objects and in messages."""

    kind: str
    api_version: str
    group: str


_KINDS = {"pods": _Kind("Pod", "v1", ""), "deployments": _Kind("Deployment", "apps/v1", "apps")}

# What this stand-in serves, by (group, version, resource, subresource): the verbs.
_SERVED_VERBS: dict[tuple[str, str, str, str], frozenset[str]] = {
    ("", "v1", "pods", ""): frozenset({"get", "list", "watch"}),
    ("apps", "v1", "deployments", ""): frozenset(
        {"get", "list", "watch", "patch", "update", "create", "delete"}
    ),
    ("apps", "v1", "deployments", "scale"): frozenset({"get", "patch", "update"}),
}


# --- RBAC -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicyRule:
    """One rule of an RBAC role: these verbs on these resources of these API groups.

    Matching copies the RBAC authorizer (pkg/apis/rbac/v1/evaluation_helpers.go): "*" matches
    any verb, group or resource; a subresource is granted as "deployments/scale" (or "*/scale"
    for every resource), never by "deployments" alone.
    """

    verbs: tuple[str, ...]
    api_groups: tuple[str, ...]
    resources: tuple[str, ...]

    def allows(self, verb: str, api_group: str, resource: str, subresource: str) -> bool:
        requested = f"{resource}/{subresource}" if subresource else resource
        return (
            ("*" in self.verbs or verb in self.verbs)
            and ("*" in self.api_groups or api_group in self.api_groups)
            and any(
                granted in ("*", requested) or (subresource != "" and granted == f"*/{subresource}")
                for granted in self.resources
            )
        )


@dataclass(frozen=True)
class ClusterRole:
    """A named set of rules, bound to users cluster-wide or in one namespace."""

    name: str
    rules: tuple[PolicyRule, ...]


def cluster_role_from_manifest(path: Path, name: str) -> ClusterRole:
    """The ClusterRole called `name` as a manifest file declares it (the same rules the real
    API server would load from it with `kubectl apply`)."""
    import yaml

    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "ClusterRole" and doc["metadata"]["name"] == name:
            return ClusterRole(name, tuple(
                PolicyRule(tuple(r["verbs"]), tuple(r.get("apiGroups", [""])),
                           tuple(r["resources"]))
                for r in doc.get("rules", [])
            ))  # fmt: skip
    raise KeyError(f"no ClusterRole {name!r} in {path}")


WATTOPS_VIEWER = ClusterRole(
    "wattops-viewer", (PolicyRule(("get", "list", "watch"), ("*",), ("*",)),)
)
WATTOPS_OPERATOR = ClusterRole(
    "wattops-operator",
    (
        *WATTOPS_VIEWER.rules,
        PolicyRule(("patch", "update"), ("apps",), ("deployments", "deployments/scale")),
    ),
)


@dataclass(frozen=True)
class _Binding:
    """A RoleBinding (in `namespace`) or ClusterRoleBinding (namespace None) to a ClusterRole."""

    user: str
    role: ClusterRole
    namespace: str | None


# --- Status errors --------------------------------------------------------------------------


class StatusError(Exception):
    """A refused request, carrying the metav1.Status the real server answers with."""

    def __init__(
        self, code: int, reason: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details

    def status(self) -> Json:
        status: Json = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
        }
        if self.details is not None:
            # StatusDetails fields are omitempty.
            status["details"] = {key: value for key, value in self.details.items() if value}
        status["code"] = self.code
        return status


def _group_resource(group: str, resource: str) -> str:
    """schema.GroupResource.String(): "pods", "deployments.apps"."""
    return f"{resource}.{group}" if group else resource


def _details(group: str, resource: str, name: str) -> Json:
    return {"name": name, "group": group, "kind": resource}


def _not_found(group: str, resource: str, name: str) -> StatusError:
    return StatusError(
        404,
        "NotFound",
        f"{_group_resource(group, resource)} {_quote(name)} not found",
        _details(group, resource, name),
    )


def _conflict(group: str, resource: str, name: str) -> StatusError:
    return StatusError(
        409,
        "Conflict",
        f"Operation cannot be fulfilled on {_group_resource(group, resource)} {_quote(name)}: "
        "the object has been modified; please apply your changes to the latest version "
        "and try again",
        _details(group, resource, name),
    )


@dataclass(frozen=True)
class _FieldError:
    """A field.Error of type FieldValueInvalid or FieldValueRequired."""

    field: str
    detail: str
    value: Any = None
    required: bool = False

    def body(self) -> str:
        if self.required:
            return f"Required value: {self.detail}" if self.detail else "Required value"
        return f"Invalid value: {_go_value(self.value)}: {self.detail}"

    def cause(self) -> Json:
        reason = "FieldValueRequired" if self.required else "FieldValueInvalid"
        return {"reason": reason, "message": self.body(), "field": self.field}


def _invalid(kind: str, group: str, name: str, errors: Sequence[_FieldError]) -> StatusError:
    messages = [f"{error.field}: {error.body()}" for error in errors]
    aggregate = messages[0] if len(messages) == 1 else f"[{', '.join(messages)}]"
    return StatusError(
        422,
        "Invalid",
        f"{kind}.{group} {_quote(name)} is invalid: {aggregate}",
        {"name": name, "group": group, "kind": kind, "causes": [e.cause() for e in errors]},
    )


def _bad_request(message: str) -> StatusError:
    return StatusError(400, "BadRequest", message)


def _patch_does_not_apply() -> StatusError:
    # NewGenericServerResponse(422, ...) as handlers/patch.go answers a JSON patch that fails.
    return StatusError(
        422, "Invalid", "the server rejected our request due to an error in our request", {}
    )


def _quote(text: str) -> str:
    """Go's %q for the names and values that appear in messages."""
    return json.dumps(text)


def _go_value(value: Any) -> str:
    """How field errors print a value: strings quoted, maps as Go maps, numbers bare."""
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, dict):
        pairs = ", ".join(f"{_quote(k)}:{_quote(str(v))}" for k, v in sorted(value.items()))
        return f"map[string]string{{{pairs}}}"
    return json.dumps(value)


# --- Selectors ------------------------------------------------------------------------------

_SET_REQUIREMENT = re.compile(r"^(?P<key>[\w./-]+)\s+(?P<op>in|notin)\s+\((?P<values>[^()]*)\)$")
_EQUALITY_REQUIREMENT = re.compile(r"^(?P<key>[\w./-]+)\s*(?P<op>==|=|!=)\s*(?P<value>[\w.-]*)$")
_EXISTS_REQUIREMENT = re.compile(r"^(?P<negated>!?)\s*(?P<key>[\w./-]+)$")
_FIELD_REQUIREMENT = re.compile(r"^(?P<field>[\w.]+)\s*(?P<op>==|=|!=)\s*(?P<value>.*)$")


def _split_requirements(selector: str) -> list[str]:
    """Split at the commas that separate requirements, not those inside `in (a,b)`."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(selector):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(selector[start:index])
            start = index + 1
    parts.append(selector[start:])
    return [part.strip() for part in parts if part.strip()]


def _label_requirement(requirement: str) -> Callable[[Mapping[str, str]], bool]:
    if match := _SET_REQUIREMENT.match(requirement):
        key = match["key"]
        values = {value.strip() for value in match["values"].split(",") if value.strip()}
        if match["op"] == "in":
            return lambda labels: labels.get(key) in values
        return lambda labels: labels.get(key) not in values
    if match := _EQUALITY_REQUIREMENT.match(requirement):
        key, value = match["key"], match["value"]
        if match["op"] == "!=":
            return lambda labels: labels.get(key) != value
        return lambda labels: labels.get(key) == value
    if match := _EXISTS_REQUIREMENT.match(requirement):
        key = match["key"]
        if match["negated"]:
            return lambda labels: key not in labels
        return lambda labels: key in labels
    raise _bad_request(f"unable to parse requirement: {_quote(requirement)}")


def _label_selector(selector: str) -> Matcher:
    requirements = [_label_requirement(part) for part in _split_requirements(selector)]

    def matches(obj: Json) -> bool:
        labels = obj["metadata"].get("labels") or {}
        return all(requirement(labels) for requirement in requirements)

    return matches


def _field_value(obj: Json, path: str) -> str:
    value: Any = obj
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def _field_selector(resource: str, selector: str) -> Matcher:
    requirements: list[tuple[str, bool, str]] = []
    for part in filter(None, (part.strip() for part in selector.split(","))):
        match = _FIELD_REQUIREMENT.match(part)
        if match is None:
            raise _bad_request(f"invalid selector: {_quote(selector)}")
        if match["field"] not in _SELECTABLE_FIELDS[resource]:
            raise _bad_request(f"field label not supported: {match['field']}")
        requirements.append((match["field"], match["op"] != "!=", match["value"]))

    def matches(obj: Json) -> bool:
        return all((_field_value(obj, f) == value) == equal for f, equal, value in requirements)

    return matches


# --- Patches --------------------------------------------------------------------------------


def _strategic_merge(original: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """Apply a strategic merge patch to `original`, whose place in a Deployment is `path`."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return _strategic_merge(None, {k: v for k, v in patch.items() if k != "$patch"}, path)
    merged = copy.deepcopy(original) if isinstance(original, dict) else {}
    for key, value in patch.items():
        child = (*path, key)
        if key.startswith("$"):
            # Directives ($patch, $setElementOrder/..., $retainKeys) are not data.
            continue
        if value is None or (isinstance(value, dict) and value.get("$patch") == "delete"):
            merged.pop(key, None)
        elif isinstance(value, list) and child in _MERGE_KEYS:
            merged[key] = _merge_list(merged.get(key), value, child)
        else:
            merged[key] = _strategic_merge(merged.get(key), value, child)
    return merged


def _merge_list(original: Any, patch: list[Any], path: tuple[str, ...]) -> list[Any]:
    """Merge a list item by item on its patchMergeKey; new items are appended."""
    merge_key = _MERGE_KEYS[path]

    def directive(item: Any) -> Any:
        return item.get("$patch") if isinstance(item, dict) else None

    if any(directive(item) == "replace" for item in patch):
        return [
            _strategic_merge(None, item, path) for item in patch if directive(item) != "replace"
        ]
    merged = copy.deepcopy(original) if isinstance(original, list) else []
    for item in patch:
        if not isinstance(item, dict) or merge_key not in item:
            raise _bad_request(f"map: {item} does not contain declared merge key: {merge_key}")
        key = item[merge_key]
        if directive(item) == "delete":
            merged = [entry for entry in merged if entry.get(merge_key) != key]
            continue
        position = next((i for i, entry in enumerate(merged) if entry.get(merge_key) == key), None)
        if position is None:
            merged.append(_strategic_merge(None, item, path))
        else:
            merged[position] = _strategic_merge(merged[position], item, path)
    return merged


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    merged = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = _merge_patch(merged.get(key), value)
    return merged


def _pointer_tokens(pointer: Any) -> list[str]:
    """RFC 6901 JSON pointer reference tokens."""
    if not isinstance(pointer, str) or (pointer and not pointer.startswith("/")):
        raise _patch_does_not_apply()
    if not pointer:
        return []
    return [token.replace("~1", "/").replace("~0", "~") for token in pointer[1:].split("/")]


def _array_index(array: list[Any], token: str, *, for_insert: bool = False) -> int:
    if for_insert and token == "-":
        return len(array)
    if not token.isdigit() or (len(token) > 1 and token.startswith("0")):
        raise _patch_does_not_apply()
    index = int(token)
    if index > len(array) or (index == len(array) and not for_insert):
        raise _patch_does_not_apply()
    return index


def _pointer_get(document: Any, tokens: list[str]) -> Any:
    value = document
    for token in tokens:
        if isinstance(value, dict) and token in value:
            value = value[token]
        elif isinstance(value, list):
            value = value[_array_index(value, token)]
        else:
            raise _patch_does_not_apply()
    return value


def _pointer_add(document: Any, tokens: list[str], value: Any) -> Any:
    if not tokens:
        return value
    parent = _pointer_get(document, tokens[:-1])
    if isinstance(parent, dict):
        parent[tokens[-1]] = value
    elif isinstance(parent, list):
        parent.insert(_array_index(parent, tokens[-1], for_insert=True), value)
    else:
        raise _patch_does_not_apply()
    return document


def _pointer_remove(document: Any, tokens: list[str]) -> Any:
    """Remove the value at `tokens` and return it."""
    if not tokens:
        raise _patch_does_not_apply()
    parent = _pointer_get(document, tokens[:-1])
    if isinstance(parent, dict) and tokens[-1] in parent:
        return parent.pop(tokens[-1])
    if isinstance(parent, list):
        return parent.pop(_array_index(parent, tokens[-1]))
    raise _patch_does_not_apply()


def _json_equal(left: Any, right: Any) -> bool:
    """JSON equality for the `test` operation: unlike Python's ==, true is not 1."""
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_json_equal(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(_json_equal, left, right))
    return bool(left == right)


def _json_patch(document: Json, operations: Any) -> Any:
    """RFC 6902 JSON patch; any operation that does not apply fails the whole patch."""
    if not isinstance(operations, list):
        raise _bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    result: Any = copy.deepcopy(document)
    for operation in operations:
        if not isinstance(operation, dict):
            raise _patch_does_not_apply()
        op, path = operation.get("op"), _pointer_tokens(operation.get("path"))
        if op in ("add", "replace", "test") and "value" not in operation:
            raise _patch_does_not_apply()
        if op == "add":
            result = _pointer_add(result, path, copy.deepcopy(operation["value"]))
        elif op == "remove":
            _pointer_remove(result, path)
        elif op == "replace":
            _pointer_get(result, path)
            if path:
                _pointer_remove(result, path)
            result = _pointer_add(result, path, copy.deepcopy(operation["value"]))
        elif op in ("move", "copy"):
            source = _pointer_tokens(operation.get("from"))
            value = copy.deepcopy(_pointer_get(result, source))
            if op == "move":
                _pointer_remove(result, source)
            result = _pointer_add(result, path, value)
        elif op == "test":
            if not _json_equal(_pointer_get(result, path), operation["value"]):
                raise _patch_does_not_apply()
        else:
            raise _patch_does_not_apply()
    return result


def _apply_patch(content_type: str, document: Json, body: bytes) -> Any:
    try:
        patch = json.loads(body)
    except ValueError as error:
        raise _bad_request(f"error decoding patch: {error}") from error
    if content_type == JSON_PATCH:
        return _json_patch(document, patch)
    if not isinstance(patch, dict):
        raise _bad_request(
            f"json: cannot unmarshal {_json_type(patch)} into Go value of type "
            "map[string]interface {}"
        )
    if content_type == MERGE_PATCH:
        return _merge_patch(document, patch)
    return _strategic_merge(document, patch)


def _decode_object(body: bytes) -> Json:
    try:
        obj = json.loads(body)
    except ValueError as error:
        raise _bad_request(f"error decoding request body: {error}") from error
    if not isinstance(obj, dict):
        raise _bad_request("the request body is not a JSON object")
    return obj


# --- Deployments: defaults, validation, rollout arithmetic -----------------------------------


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _default_pull_policy(image: str) -> str:
    """Always for `:latest` or an untagged image, else IfNotPresent (core/v1 defaults)."""
    if "@" in image:
        return "IfNotPresent"
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    return "Always" if tag in ("", "latest") else "IfNotPresent"


def _apply_deployment_defaults(deployment: Json) -> None:
    """The defaults the real server fills in on every write (apps/v1 and core/v1 defaults.go)."""
    spec = deployment.setdefault("spec", {})
    if spec.get("replicas") is None:
        spec["replicas"] = 1
    spec.setdefault("revisionHistoryLimit", 10)
    spec.setdefault("progressDeadlineSeconds", 600)
    strategy = spec.setdefault("strategy", {})
    strategy.setdefault("type", "RollingUpdate")
    if strategy["type"] == "RollingUpdate":
        rolling = strategy.setdefault("rollingUpdate", {})
        rolling.setdefault("maxSurge", "25%")
        rolling.setdefault("maxUnavailable", "25%")
    pod_spec = spec.setdefault("template", {}).setdefault("spec", {})
    pod_spec.setdefault("restartPolicy", "Always")
    pod_spec.setdefault("terminationGracePeriodSeconds", 30)
    pod_spec.setdefault("dnsPolicy", "ClusterFirst")
    pod_spec.setdefault("schedulerName", "default-scheduler")
    pod_spec.setdefault("securityContext", {})
    for container in pod_spec.get("containers") or []:
        container.setdefault("imagePullPolicy", _default_pull_policy(container.get("image", "")))
        container.setdefault("terminationMessagePath", "/dev/termination-log")
        container.setdefault("terminationMessagePolicy", "File")
        container.setdefault("resources", {})


def _omit_empty(deployment: Json) -> None:
    """Drop empty maps and lists whose Go fields are omitempty, as the real encoding does."""
    template = deployment["spec"].get("template") or {}
    for metadata in (deployment["metadata"], template.get("metadata") or {}):
        for key in ("labels", "annotations"):
            if metadata.get(key) == {}:
                del metadata[key]
    for container in (template.get("spec") or {}).get("containers") or []:
        for key in ("env", "ports", "volumeMounts"):
            if container.get(key) == []:
                del container[key]


_PERCENT = re.compile(r"^[0-9]+%$")
_PERCENT_MESSAGE = (
    "a valid percent string must be a numeric string followed by an ending '%' "
    "(e.g. '1%',  or '93%', regex used for validation is '[0-9]+%')"
)


def _validate_deployment(deployment: Json, current: Json | None) -> list[_FieldError]:
    """The validation errors (apps/validation) that wattops' writes can run into."""
    spec = deployment["spec"]
    errors = []
    if spec["replicas"] < 0:
        errors.append(
            _FieldError("spec.replicas", "must be greater than or equal to 0", spec["replicas"])
        )
    match_labels = (spec.get("selector") or {}).get("matchLabels") or {}
    template_labels = (spec["template"].get("metadata") or {}).get("labels") or {}
    if not match_labels:
        errors.append(_FieldError("spec.selector", "", required=True))
    elif any(template_labels.get(key) != value for key, value in match_labels.items()):
        errors.append(
            _FieldError(
                "spec.template.metadata.labels",
                "`selector` does not match template `labels`",
                template_labels,
            )
        )
    if current is not None and spec.get("selector") != current["spec"].get("selector"):
        errors.append(_FieldError("spec.selector", "field is immutable", match_labels))
    if not spec["template"]["spec"].get("containers"):
        errors.append(_FieldError("spec.template.spec.containers", "", required=True))
    rolling = spec["strategy"].get("rollingUpdate") or {}
    amounts = {}
    for name, value in rolling.items():
        path = f"spec.strategy.rollingUpdate.{name}"
        if isinstance(value, str) and _PERCENT.match(value):
            amounts[name] = int(value[:-1])
        elif not isinstance(value, int) or isinstance(value, bool):
            errors.append(_FieldError(path, _PERCENT_MESSAGE, value))
        elif value < 0:
            errors.append(_FieldError(path, "must be greater than or equal to 0", value))
        else:
            amounts[name] = value
    if amounts.get("maxSurge") == 0 and amounts.get("maxUnavailable") == 0:
        errors.append(
            _FieldError(
                "spec.strategy.rollingUpdate.maxUnavailable",
                "may not be 0 when `maxSurge` is 0",
                rolling["maxUnavailable"],
            )
        )
    return errors


def _json_type(value: Any) -> str:
    """The JSON type name Go's encoding/json uses in its errors."""
    names = {bool: "bool", str: "string", int: "number", float: "number", list: "array"}
    return names.get(type(value), "object")


def _require_int32(value: Any, go_field: str) -> None:
    """Reject what the real server's JSON decoding into an int32 rejects, with its message."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad_request(
            f"json: cannot unmarshal {_json_type(value)} into Go struct field {go_field} "
            "of type int32"
        )


def _scaled_value(value: int | str, total: int, *, round_up: bool) -> int:
    """intstr.GetScaledValueFromIntOrPercent: an int as is, a percent of `total` rounded."""
    if isinstance(value, int):
        return value
    fraction = int(value.rstrip("%")) * total / 100
    return math.ceil(fraction) if round_up else math.floor(fraction)


def _fenceposts(spec: Json) -> tuple[int, int]:
    """deploymentutil.ResolveFenceposts: (maxSurge, maxUnavailable), never both zero."""
    desired = spec["replicas"]
    rolling = spec["strategy"].get("rollingUpdate") or {}
    surge = _scaled_value(rolling.get("maxSurge", "25%"), desired, round_up=True)
    unavailable = _scaled_value(rolling.get("maxUnavailable", "25%"), desired, round_up=False)
    if surge == 0 and unavailable == 0:
        # Rounding down can leave both at zero; the controller then lets one pod go at a time.
        unavailable = 1
    return surge, unavailable


def _max_unavailable(spec: Json) -> int:
    if spec["strategy"]["type"] != "RollingUpdate" or spec["replicas"] == 0:
        return 0
    return min(_fenceposts(spec)[1], spec["replicas"])


def _template_hash(template: Json) -> str:
    """A pod-template-hash: a digest of the template in the real one's alphabet and length.

    The real controller hashes Go's printout of the template with FNV-32a, so the values
    differ; equal templates still get equal hashes and changed ones new hashes.
    """
    canonical = json.dumps(template, sort_keys=True, separators=(",", ":")).encode()
    number = int.from_bytes(hashlib.sha256(canonical).digest()[:4], "big")
    return "".join(_NAME_ALPHABET[ord(char) % len(_NAME_ALPHABET)] for char in str(number))


def _condition(conditions: Sequence[Json], kind: str) -> Json | None:
    return next((c for c in conditions if c.get("type") == kind), None)


def _set_condition(
    conditions: list[Json],
    kind: str,
    status: str,
    reason: str,
    message: str,
    *,
    refresh: bool = False,
) -> bool:
    """deploymentutil.SetDeploymentCondition; returns whether the condition was (re)written.

    Like the real helper it leaves a condition with the same status and reason alone, unless
    `refresh` (how the controller bumps lastUpdateTime when a rollout progresses), and keeps
    lastTransitionTime while the status stays the same.
    """
    existing = _condition(conditions, kind)
    if (
        not refresh
        and existing is not None
        and (existing["status"], existing["reason"]) == (status, reason)
    ):
        return False
    stamp = _timestamp()
    transition = (
        existing["lastTransitionTime"]
        if existing is not None and existing["status"] == status
        else stamp
    )
    conditions[:] = [c for c in conditions if c["type"] != kind]
    conditions.append(
        {
            "type": kind,
            "status": status,
            "lastUpdateTime": stamp,
            "lastTransitionTime": transition,
            "reason": reason,
            "message": message,
        }
    )
    return True


def _count(status: Json, key: str) -> int:
    return int(status.get(key) or 0)


def _has_progress_deadline(spec: Json) -> bool:
    """deploymentutil.HasProgressDeadline: MaxInt32 means no deadline."""
    return spec.get("progressDeadlineSeconds") not in (None, 2**31 - 1)


def _rollout_complete(deployment: Json) -> bool:
    """deploymentutil.DeploymentComplete."""
    desired, status = deployment["spec"]["replicas"], deployment.get("status") or {}
    return (
        _count(status, "updatedReplicas") == desired
        and _count(status, "replicas") == desired
        and _count(status, "availableReplicas") == desired
        and _count(status, "observedGeneration") >= deployment["metadata"]["generation"]
    )


def _made_progress(old: Json, new: Json) -> bool:
    """deploymentutil.DeploymentProgressing: more updated, ready or available, or fewer old."""
    old_old = _count(old, "replicas") - _count(old, "updatedReplicas")
    new_old = _count(new, "replicas") - _count(new, "updatedReplicas")
    return (
        _count(new, "updatedReplicas") > _count(old, "updatedReplicas")
        or new_old < old_old
        or _count(new, "readyReplicas") > _count(old, "readyReplicas")
        or _count(new, "availableReplicas") > _count(old, "availableReplicas")
    )


def _selector_string(selector: Json) -> str:
    """labels.Selector.String() of a matchLabels selector: requirements sorted by key."""
    labels = selector.get("matchLabels") or {}
    return ",".join(f"{key}={labels[key]}" for key in sorted(labels))


# --- Pods -----------------------------------------------------------------------------------


def _pod_ready(pod: Json) -> bool:
    ready = _condition((pod.get("status") or {}).get("conditions") or [], "Ready")
    return ready is not None and ready["status"] == "True"


def _pod_status(
    pod: Json,
    *,
    started: bool,
    ready: bool,
    crashing: bool = False,
    restart_count: int = 0,
    pod_ip: str | None = None,
    start_time: str,
) -> Json:
    """A pod's status as the kubelet reports it: waiting to start, running, or crash-looping.

    Only the first container crash-loops; `ready` is the readiness probe's verdict for the
    running ones.
    """
    metadata = pod["metadata"]
    now = _timestamp()
    statuses = []
    for index, container in enumerate(pod["spec"]["containers"]):
        crashed = crashing and index == 0
        if not started:
            state, last_state, container_ready = (
                {"waiting": {"reason": "ContainerCreating"}},
                {},
                False,
            )
        elif crashed:
            back_off = min(10 * 2 ** max(restart_count - 1, 0), 300)
            state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {back_off}s restarting failed container="
                    f"{container['name']} pod={metadata['name']}_{metadata['namespace']}"
                    f"({metadata['uid']})",
                }
            }
            last_state = {
                "terminated": {
                    "exitCode": 1,
                    "reason": "Error",
                    "startedAt": start_time,
                    "finishedAt": now,
                }
            }
            container_ready = False
        else:
            state, last_state, container_ready = {"running": {"startedAt": start_time}}, {}, ready
        statuses.append(
            {
                "name": container["name"],
                "state": state,
                "lastState": last_state,
                "ready": container_ready,
                "restartCount": restart_count if crashed else 0,
                "image": container.get("image", ""),
                "imageID": "",
                "started": started and not crashed,
            }
        )
    unready = [status["name"] for status in statuses if not status["ready"]]

    def condition(kind: str, true: bool) -> Json:
        result: Json = {
            "type": kind,
            "status": "True" if true else "False",
            "lastProbeTime": None,
            "lastTransitionTime": now,
        }
        if not true:
            result["reason"] = "ContainersNotReady"
            result["message"] = f"containers with unready status: [{' '.join(unready)}]"
        return result

    status: Json = {
        "phase": "Running" if started else "Pending",
        "conditions": [
            condition("Initialized", True),
            condition("Ready", not unready),
            condition("ContainersReady", not unready),
            condition("PodScheduled", True),
        ],
        "startTime": start_time,
        "containerStatuses": statuses,
        "qosClass": "BestEffort",
    }
    if started and pod_ip is not None:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    return status


@dataclass
class _PodLife:
    """Where a controller-made pod is in its (compressed) life: created, started, restarting."""

    ready_at: float
    interval_s: float
    crashing: bool
    pod_ip: str
    start_time: str
    started: bool = False
    restart_count: int = 0
    next_restart_at: float = 0.0


@dataclass
class _ReplicaSet:
    """A ReplicaSet of a Deployment; kept inside the stand-in, not served."""

    name: str
    template_hash: str
    template: Json
    revision: int
    replicas: int = 0


@dataclass(frozen=True)
class _Change:
    """One write, as the watch cache keeps it: the object after and before."""

    resource_version: int
    resource: str
    type: str
    object: Json
    previous: Json | None


@dataclass(frozen=True)
class _RequestInfo:
    """What the real server's RequestInfoFactory reads from a request, for RBAC and routing."""

    verb: str
    api_group: str
    api_version: str
    resource: str
    subresource: str
    namespace: str
    name: str


def _request_info(method: str, path: str, query: Mapping[str, str]) -> _RequestInfo | None:
    """Parse a resource request; None for anything else (discovery, /version, ...)."""
    parts = [part for part in path.split("/") if part]
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    namespace = ""
    if len(rest) >= 2 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:] or ["namespaces", rest[1]]
    if not rest or len(rest) > 3:
        return None
    resource, name, subresource = (*rest, "", "")[:3]
    if method in ("GET", "HEAD"):
        verb = "get" if name else "list"
        if query.get("watch", "false").lower() not in ("false", "0"):
            verb = "watch"
    else:
        verb = {"PUT": "update", "PATCH": "patch", "POST": "create"}.get(method, method.lower())
        if method == "DELETE":
            verb = "delete" if name else "deletecollection"
    return _RequestInfo(verb, group, version, resource, subresource, namespace, name)


# --- The server -----------------------------------------------------------------------------


class KubeApiServer:
    """The stand-in API server and deployment controller, on a loopback port in a thread.

    Use it as a context manager (or `start()`/`stop()`), point a
    `kubernetes.client.Configuration` at `url` (`configuration(token)` makes one), and seed
    it with `add_deployment` and `add_pod`. Users `viewer` and `operator` exist from the start,
    bound cluster-wide to WATTOPS_VIEWER and WATTOPS_OPERATOR, with VIEWER_TOKEN and
    OPERATOR_TOKEN.
    """

    def __init__(
        self,
        *,
        ready_after_s: float = 0.2,
        tick_s: float = 0.05,
        nodes: Sequence[str] = ("node-1",),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.ready_after_s = ready_after_s
        """How long after creation a new pod of a Deployment starts (and is ready)."""
        self._tick_s = tick_s
        self._nodes = tuple(nodes)
        self._host = host
        self._port = port
        self.url = ""
        """The server's base URL, e.g. http://127.0.0.1:40123, once started."""

        self._lock = threading.RLock()
        self._resource_version = 0
        self._objects: dict[str, dict[tuple[str, str], Json]] = {kind: {} for kind in _KINDS}
        self._changes: list[_Change] = []
        self._users_by_token: dict[str, str] = {}
        self._bindings: list[_Binding] = []
        self._replica_sets: dict[tuple[str, str], list[_ReplicaSet]] = {}
        self._pod_lives: dict[tuple[str, str], _PodLife] = {}
        self._progress_marks: dict[tuple[str, str], float] = {}
        self._crash_predicate: Callable[[Json], bool] | None = None
        self._pods_made = 0

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._controller: asyncio.Task[None] | None = None
        self._controller_failure: BaseException | None = None
        self._changed: asyncio.Event | None = None
        self._stopping = False

        self.add_user("viewer", VIEWER_TOKEN)
        self.bind("viewer", WATTOPS_VIEWER)
        self.add_user("operator", OPERATOR_TOKEN)
        self.bind("operator", WATTOPS_OPERATOR)

    # --- lifecycle ---

    def start(self) -> Self:
        """Serve on a fresh event loop in a background thread; returns once it accepts."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kube-apiserver", daemon=True
        )
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        """End open watches, close the port and the thread."""
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    async def _open(self) -> None:
        self._stopping = False
        self._changed = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind((self._host, self._port))
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.url = f"http://{self._host}:{sock.getsockname()[1]}"
        self._controller = asyncio.create_task(self._run_controller())

    async def _close(self) -> None:
        self._stopping = True
        self._wake_watchers()
        if self._controller is not None:
            self._controller.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    def configuration(self, token: str) -> kubernetes.client.Configuration:
        """A client configuration for this server, authenticating with `token`."""
        return kubernetes.client.Configuration(
            host=self.url, api_key={"authorization": f"Bearer {token}"}
        )

    def write_kubeconfig(self, path: Path, token: str) -> Path:
        """A kubeconfig file for this server and `token` (one context, current), as
        `kubectl config` would write it; returns `path`."""
        path.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
                    "users": [{"name": "user", "user": {"token": token}}],
                    "contexts": [
                        {"name": "standin", "context": {"cluster": "standin", "user": "user"}}
                    ],
                    "current-context": "standin",
                }
            )
        )
        return path

    # --- users ---

    def add_user(self, name: str, token: str) -> None:
        """Let `token` authenticate as user `name` (a static token file entry)."""
        with self._lock:
            self._users_by_token[token] = name

    def bind(self, user: str, role: ClusterRole, namespace: str | None = None) -> None:
        """Grant `role` to `user`: in `namespace` (a RoleBinding) or everywhere (None)."""
        with self._lock:
            self._bindings.append(_Binding(user, role, namespace))

    # --- seeding and test hooks ---

    def add_deployment(
        self,
        namespace: str,
        name: str,
        labels: Mapping[str, str],
        *,
        containers: Sequence[Mapping[str, Any]] | None = None,
        replicas: int = 1,
        strategy: Mapping[str, Any] | None = None,
        progress_deadline_seconds: int = 600,
    ) -> Json:
        """Create a Deployment selecting `labels`, as `kubectl create` would; returns it.

        The controller makes its pods from the next tick on; `settle()` waits for them.
        """
        spec: Json = {
            "replicas": replicas,
            "selector": {"matchLabels": dict(labels)},
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "containers": [copy.deepcopy(dict(c)) for c in containers]
                    if containers is not None
                    else [{"name": "server", "image": "wattops/replica:test"}]
                },
            },
            "progressDeadlineSeconds": progress_deadline_seconds,
        }
        if strategy is not None:
            spec["strategy"] = copy.deepcopy(dict(strategy))
        deployment: Json = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "generation": 1,
                "labels": dict(labels),
                "creationTimestamp": _timestamp(),
            },
            "spec": spec,
            "status": {},
        }
        _apply_deployment_defaults(deployment)
        if errors := _validate_deployment(deployment, None):
            raise _invalid("Deployment", "apps", name, errors)
        with self._lock:
            if (namespace, name) in self._objects["deployments"]:
                raise ValueError(f"deployment {namespace}/{name} already exists")
            return self._commit("deployments", deployment, "ADDED")

    def add_pod(
        self,
        namespace: str,
        name: str,
        labels: Mapping[str, str],
        node_name: str,
        pod_ip: str,
        *,
        ready: bool = True,
        containers: Sequence[Mapping[str, Any]] | None = None,
        replica_set: str | None = None,
    ) -> Json:
        """Create a running pod on `node_name` (e.g. a wattops-agent DaemonSet pod); returns it.

        `replica_set`: the pod is owned by that ReplicaSet, as one made by a Deployment's
        controller is (ownerReferences with controller true); give its pod-template-hash in
        `labels`. No controller here acts on it, so its address and readiness stay the test's.
        """
        metadata: Json = {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "labels": dict(labels),
            "creationTimestamp": _timestamp(),
        }
        if replica_set is not None:
            metadata["ownerReferences"] = [
                {
                    "apiVersion": "apps/v1",
                    "kind": "ReplicaSet",
                    "name": replica_set,
                    "uid": str(uuid.uuid5(uuid.NAMESPACE_OID, replica_set)),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
        pod: Json = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": metadata,
            "spec": {
                "containers": [copy.deepcopy(dict(c)) for c in containers]
                if containers is not None
                else [{"name": "agent", "image": "wattops/agent:test"}],
                "nodeName": node_name,
                "restartPolicy": "Always",
                "schedulerName": "default-scheduler",
            },
        }
        pod["status"] = _pod_status(
            pod, started=True, ready=ready, pod_ip=pod_ip, start_time=_timestamp()
        )
        with self._lock:
            if (namespace, name) in self._objects["pods"]:
                raise ValueError(f"pod {namespace}/{name} already exists")
            return self._commit("pods", pod, "ADDED")

    def set_pod_ready(self, namespace: str, name: str, ready: bool) -> Json:
        """Flip a running pod's readiness, as a readiness probe starting to pass or fail."""
        with self._lock:
            pod = copy.deepcopy(self._stored("pods", namespace, name))
            status = pod["status"]
            if status["phase"] != "Running":
                raise ValueError(f"pod {namespace}/{name} is {status['phase']}, not Running")
            pod["status"] = _pod_status(
                pod,
                started=True,
                ready=ready,
                pod_ip=status.get("podIP"),
                start_time=status["startTime"],
            )
            return self._commit("pods", pod, "MODIFIED")

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod; a Deployment's ReplicaSet replaces it on the next tick."""
        with self._lock:
            pod = copy.deepcopy(self._stored("pods", namespace, name))
            self._pod_lives.pop((namespace, name), None)
            self._commit("pods", pod, "DELETED")

    def crash_when(self, predicate: Callable[[Json], bool] | None) -> None:
        """Make pods created from now on crash-loop when `predicate(first container)` is true.

        The predicate sees the pod template's first container as a dict (name, image, env,
        ...); None stops crashing new pods. Pods already made keep their fate.
        """
        with self._lock:
            self._crash_predicate = predicate

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until every Deployment's rollout is complete; TimeoutError names the others."""
        if self._loop is None:
            raise RuntimeError("settle() needs a started server: call start() first")
        deadline = time.monotonic() + timeout
        while True:
            if self._controller_failure is not None:
                raise RuntimeError("the deployment controller failed") from self._controller_failure
            with self._lock:
                pending = {
                    f"{namespace}/{name}": deployment.get("status")
                    for (namespace, name), deployment in self._objects["deployments"].items()
                    if not _rollout_complete(deployment)
                }
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"rollouts still in progress after {timeout}s: {pending}")
            time.sleep(self._tick_s)

    # --- storage ---

    def _stored(self, resource: str, namespace: str, name: str) -> Json:
        try:
            return self._objects[resource][(namespace, name)]
        except KeyError:
            raise _not_found(_KINDS[resource].group, resource, name) from None

    def _commit(self, resource: str, obj: Json, event: str) -> Json:
        """Store a write under a new resourceVersion, record it for watches; returns a copy.

        Stored objects are never changed in place, so watches can share them.
        """
        metadata = obj["metadata"]
        key = (metadata["namespace"], metadata["name"])
        previous = self._objects[resource].get(key)
        self._resource_version += 1
        metadata["resourceVersion"] = str(self._resource_version)
        stored = copy.deepcopy(obj)
        if event == "DELETED":
            del self._objects[resource][key]
        else:
            self._objects[resource][key] = stored
        self._changes.append(_Change(self._resource_version, resource, event, stored, previous))
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._wake_watchers)
        return copy.deepcopy(stored)

    def _wake_watchers(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    # --- HTTP ---

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            user = self._authenticate(request.headers.get("Authorization", ""))
            info = _request_info(request.method, request.path, request.query)
            if info is None:
                raise StatusError(
                    404, "NotFound", "the server could not find the requested resource", {}
                )
            self._authorize(user, info)
            served = _SERVED_VERBS.get(
                (info.api_group, info.api_version, info.resource, info.subresource)
            )
            if served is None or (info.name and not info.namespace):
                raise StatusError(
                    404, "NotFound", "the server could not find the requested resource", {}
                )
            if info.verb not in served:
                raise StatusError(
                    405,
                    "MethodNotAllowed",
                    "the server does not allow this method on the requested resource",
                    {},
                )
            if info.verb == "patch" and request.content_type not in PATCH_CONTENT_TYPES:
                raise StatusError(
                    415,
                    "UnsupportedMediaType",
                    "the body of the request was in an unknown format - accepted media types "
                    f"include: {', '.join(PATCH_CONTENT_TYPES)}",
                )
            if info.verb == "watch":
                return await self._watch(request, info)
            body = await request.read()
            with self._lock:
                result = self._serve(info, request.query, request.content_type, body)
            return web.json_response(
                result, status=201 if info.verb == "create" else 200, dumps=_dumps
            )
        except StatusError as error:
            return web.json_response(error.status(), status=error.code, dumps=_dumps)

    def _authenticate(self, authorization: str) -> str:
        scheme, _, token = authorization.partition(" ")
        with self._lock:
            user = self._users_by_token.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise StatusError(401, "Unauthorized", "Unauthorized")
        return user

    def _authorize(self, user: str, info: _RequestInfo) -> None:
        with self._lock:
            bindings = [b for b in self._bindings if b.user == user]
        for binding in bindings:
            if binding.namespace is not None and binding.namespace != info.namespace:
                continue
            if any(
                rule.allows(info.verb, info.api_group, info.resource, info.subresource)
                for rule in binding.role.rules
            ):
                return
        resource = f"{info.resource}/{info.subresource}" if info.subresource else info.resource
        scope = (
            f"in the namespace {_quote(info.namespace)}"
            if info.namespace
            else "at the cluster scope"
        )
        reason = (
            f"User {_quote(user)} cannot {info.verb} resource {_quote(resource)} "
            f"in API group {_quote(info.api_group)} {scope}"
        )
        subject = _group_resource(info.api_group, info.resource)
        if info.name:
            subject = f"{subject} {_quote(info.name)}"
        raise StatusError(
            403,
            "Forbidden",
            f"{subject} is forbidden: {reason}",
            _details(info.api_group, info.resource, info.name),
        )

    def _serve(
        self, info: _RequestInfo, query: Mapping[str, str], content_type: str, body: bytes
    ) -> Json:
        """Answer a non-watch request that passed authorization; the lock is held."""
        if info.verb == "list":
            return self._list(info, query)
        if info.verb == "create":
            return self._create_deployment(info.namespace, _decode_object(body))
        if info.verb == "delete":
            return self._delete_deployment(info.namespace, info.name)
        current = copy.deepcopy(self._stored(info.resource, info.namespace, info.name))
        if info.subresource == "scale":
            scale = self._scale(current)
            if info.verb == "get":
                return scale
            proposed = (
                _apply_patch(content_type, scale, body)
                if info.verb == "patch"
                else _decode_object(body)
            )
            return self._scale(self._update_scale(current, proposed))
        if info.verb == "get":
            return current
        proposed = (
            _apply_patch(content_type, current, body)
            if info.verb == "patch"
            else _decode_object(body)
        )
        return self._update_deployment(current, proposed)

    def _create_deployment(self, namespace: str, obj: Json) -> Json:
        """POST .../deployments: the object as given, with what the server sets."""
        metadata = obj.setdefault("metadata", {})
        name = metadata.get("name") or ""
        if metadata.get("namespace") not in (None, namespace):
            raise _bad_request("the namespace of the provided object does not match the "
                               "namespace sent on the request")  # fmt: skip
        if (namespace, name) in self._objects["deployments"]:
            raise StatusError(409, "AlreadyExists",
                              f"{_group_resource('apps', 'deployments')} {_quote(name)} already "
                              "exists", _details("apps", "deployments", name))  # fmt: skip
        metadata.update(namespace=namespace, uid=str(uuid.uuid4()), generation=1,
                        creationTimestamp=_timestamp())  # fmt: skip
        for key in ("resourceVersion", "deletionTimestamp"):
            metadata.pop(key, None)
        obj.update(apiVersion="apps/v1", kind="Deployment", status={})
        _apply_deployment_defaults(obj)
        if errors := _validate_deployment(obj, None):
            raise _invalid("Deployment", "apps", name, errors)
        return self._commit("deployments", obj, "ADDED")

    def _delete_deployment(self, namespace: str, name: str) -> Json:
        """DELETE .../deployments/NAME, background propagation: the Deployment goes now, the
        garbage collector removes its ReplicaSets and their pods after it."""
        stored = self._stored("deployments", namespace, name)
        self._commit("deployments", copy.deepcopy(stored), "DELETED")
        self._progress_marks.pop((namespace, name), None)
        for replica_set in self._replica_sets.pop((namespace, name), []):
            for pod in self._owned_pods(namespace, replica_set.name):
                self._pod_lives.pop((namespace, pod["metadata"]["name"]), None)
                self._commit("pods", copy.deepcopy(pod), "DELETED")
        return {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
            "details": {**_details("apps", "deployments", name), "uid": stored["metadata"]["uid"]},
        }  # fmt: skip

    def _matcher(self, info: _RequestInfo, query: Mapping[str, str]) -> Matcher:
        """The objects a list or watch request selects; a named watch selects that one."""
        labels = _label_selector(query.get("labelSelector", ""))
        fields = _field_selector(info.resource, query.get("fieldSelector", ""))
        return lambda obj: (
            (not info.namespace or obj["metadata"]["namespace"] == info.namespace)
            and (not info.name or obj["metadata"]["name"] == info.name)
            and labels(obj)
            and fields(obj)
        )

    def _list(self, info: _RequestInfo, query: Mapping[str, str]) -> Json:
        matches = self._matcher(info, query)
        kind = _KINDS[info.resource]
        return {
            "kind": f"{kind.kind}List",
            "apiVersion": kind.api_version,
            "metadata": {"resourceVersion": str(self._resource_version)},
            "items": [
                {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
                for _, obj in sorted(self._objects[info.resource].items())
                if matches(obj)
            ],
        }

    async def _watch(self, request: web.Request, info: _RequestInfo) -> web.StreamResponse:
        query = request.query
        since = query.get("resourceVersion", "")
        with self._lock:
            matches = self._matcher(info, query)
            if since in ("", "0"):
                backlog: list[Json] = [
                    {"type": "ADDED", "object": obj}
                    for _, obj in sorted(self._objects[info.resource].items())
                    if matches(obj)
                ]
                cursor = len(self._changes)
            elif since.isdigit():
                backlog = []
                cursor = bisect.bisect_right(
                    self._changes, int(since), key=lambda change: change.resource_version
                )
            else:
                raise _bad_request(f"invalid resource version: {since}")
        timeout = float(query["timeoutSeconds"]) if "timeoutSeconds" in query else None
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        try:
            for added in backlog:
                await response.write(_dumps(added).encode() + b"\n")
            while not self._stopping:
                waiter = self._changed
                with self._lock:
                    changes = self._changes[cursor:]
                cursor += len(changes)
                for change in changes:
                    event = _watch_event(change, info.resource, matches)
                    if event is not None:
                        await response.write(_dumps(event).encode() + b"\n")
                if changes:
                    continue
                remaining = None if deadline is None else deadline - loop.time()
                if (remaining is not None and remaining <= 0) or waiter is None:
                    break
                try:
                    await asyncio.wait_for(waiter.wait(), remaining)
                except TimeoutError:
                    break
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away: nothing more to send
        return response

    # --- writes ---

    def _update_deployment(self, current: Json, proposed: Any) -> Json:
        """A PUT or patched Deployment, with the real server's checks; the lock is held."""
        if not isinstance(proposed, dict):
            raise _bad_request("the patched object is not a JSON object")
        metadata = proposed.get("metadata") or {}
        name, namespace = current["metadata"]["name"], current["metadata"]["namespace"]
        if metadata.get("name") != name:
            raise _bad_request(
                f"the name of the object ({metadata.get('name', '')}) does not match the name "
                f"on the URL ({name})"
            )
        if metadata.get("namespace", namespace) != namespace:
            raise _bad_request(
                "the namespace of the provided object does not match the namespace sent on "
                "the request"
            )
        version = metadata.get("resourceVersion")
        if version and version != current["metadata"]["resourceVersion"]:
            raise _conflict("apps", "deployments", name)
        updated: Json = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                **copy.deepcopy(metadata),
                **{
                    key: current["metadata"][key]
                    for key in (
                        "name",
                        "namespace",
                        "uid",
                        "generation",
                        "creationTimestamp",
                        "resourceVersion",
                    )
                },
            },
            "spec": copy.deepcopy(proposed.get("spec") or {}),
            "status": current["status"],
        }
        _omit_empty(updated)
        _apply_deployment_defaults(updated)
        _require_int32(updated["spec"]["replicas"], "DeploymentSpec.spec.replicas")
        if errors := _validate_deployment(updated, current):
            raise _invalid("Deployment", "apps", name, errors)
        if updated["spec"] != current["spec"] or updated["metadata"].get("annotations") != current[
            "metadata"
        ].get("annotations"):
            updated["metadata"]["generation"] += 1
        if updated == current:
            return current
        return self._commit("deployments", updated, "MODIFIED")

    def _scale(self, deployment: Json) -> Json:
        """scaleFromDeployment: the autoscaling/v1 Scale view of a Deployment."""
        metadata, spec = deployment["metadata"], deployment["spec"]
        return {
            "kind": "Scale",
            "apiVersion": "autoscaling/v1",
            "metadata": {
                key: metadata[key]
                for key in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
            },
            "spec": {"replicas": spec["replicas"]} if spec["replicas"] else {},
            "status": {
                "replicas": _count(deployment.get("status") or {}, "replicas"),
                "selector": _selector_string(spec["selector"]),
            },
        }

    def _update_scale(self, deployment: Json, proposed: Any) -> Json:
        """Move a written Scale's replicas (and resourceVersion) to its Deployment."""
        if not isinstance(proposed, dict):
            raise _bad_request("the patched object is not a JSON object")
        metadata = proposed.get("metadata") or {}
        name = deployment["metadata"]["name"]
        if metadata.get("name") != name:
            raise _bad_request(
                f"the name of the object ({metadata.get('name', '')}) does not match the name "
                f"on the URL ({name})"
            )
        # autoscaling/v1 ScaleSpec.replicas is an omitempty int32: absent means 0.
        replicas = (proposed.get("spec") or {}).get("replicas", 0)
        _require_int32(replicas, "ScaleSpec.spec.replicas")
        if replicas < 0:
            raise _invalid(
                "Scale",
                "autoscaling",
                name,
                [_FieldError("spec.replicas", "must be greater than or equal to 0", replicas)],
            )
        updated = copy.deepcopy(deployment)
        updated["spec"]["replicas"] = replicas
        updated["metadata"]["resourceVersion"] = metadata.get("resourceVersion", "")
        return self._update_deployment(deployment, updated)

    # --- the deployment controller ---

    async def _run_controller(self) -> None:
        try:
            while True:
                with self._lock:
                    self._reconcile(time.monotonic())
                await asyncio.sleep(self._tick_s)
        except Exception as error:
            self._controller_failure = error
            raise

    def _reconcile(self, now: float) -> None:
        self._advance_pods(now)
        for key in list(self._objects["deployments"]):
            self._sync_deployment(key, now)

    def _advance_pods(self, now: float) -> None:
        """Start pods whose time has come and restart crash-looping ones (the kubelet)."""
        for (namespace, name), life in self._pod_lives.items():
            if not life.started and now >= life.ready_at:
                life.started = True
                if life.crashing:
                    life.restart_count, life.next_restart_at = 1, now + life.interval_s
            elif life.started and life.crashing and now >= life.next_restart_at:
                life.restart_count += 1
                life.next_restart_at = now + life.interval_s
            else:
                continue
            pod = copy.deepcopy(self._objects["pods"][(namespace, name)])
            pod["status"] = _pod_status(
                pod,
                started=True,
                ready=True,
                crashing=life.crashing,
                restart_count=life.restart_count,
                pod_ip=life.pod_ip,
                start_time=life.start_time,
            )
            self._commit("pods", pod, "MODIFIED")

    def _owned_pods(self, namespace: str, replica_set: str) -> list[Json]:
        return [
            pod
            for (pod_namespace, _), pod in self._objects["pods"].items()
            if pod_namespace == namespace
            and any(
                owner["name"] == replica_set
                for owner in pod["metadata"].get("ownerReferences") or []
            )
        ]

    def _available(self, namespace: str, replica_set: _ReplicaSet) -> int:
        # minReadySeconds is not modelled: a ready pod is available.
        return sum(map(_pod_ready, self._owned_pods(namespace, replica_set.name)))

    def _sync_deployment(self, key: tuple[str, str], now: float) -> None:
        """One pass of the deployment controller over one Deployment."""
        namespace, name = key
        current = self._objects["deployments"][key]
        deployment = copy.deepcopy(current)
        spec, old_status = deployment["spec"], deployment.get("status") or {}
        conditions = copy.deepcopy(old_status.get("conditions") or [])
        has_deadline = _has_progress_deadline(spec)

        replica_sets = self._replica_sets.setdefault(key, [])
        template_hash = _template_hash(spec["template"])
        latest = max((rs.revision for rs in replica_sets), default=0)
        new_rs = next((rs for rs in replica_sets if rs.template_hash == template_hash), None)
        if new_rs is None:
            new_rs = _ReplicaSet(
                f"{name}-{template_hash}",
                template_hash,
                copy.deepcopy(spec["template"]),
                latest + 1,
            )
            replica_sets.append(new_rs)
            if has_deadline:
                message = f"Created new replica set {_quote(new_rs.name)}"
                self._set_progressing(key, conditions, "NewReplicaSetCreated", message, now)
        else:
            if new_rs.revision < latest:
                # A rollback: the old ReplicaSet becomes the newest revision again.
                new_rs.revision = latest + 1
            if has_deadline and _condition(conditions, "Progressing") is None:
                message = f"Found new replica set {_quote(new_rs.name)}"
                self._set_progressing(key, conditions, "FoundNewReplicaSet", message, now)
        deployment["metadata"].setdefault("annotations", {})[REVISION_ANNOTATION] = str(
            new_rs.revision
        )

        old_sets = [rs for rs in replica_sets if rs is not new_rs]
        if spec["strategy"]["type"] == "Recreate":
            self._roll_out_recreate(namespace, spec, new_rs, old_sets)
        elif not self._scale_up_new(spec, new_rs, replica_sets):
            self._scale_down_old(namespace, spec, new_rs, old_sets)
        for replica_set in replica_sets:
            self._sync_replica_set_pods(namespace, replica_set, now)

        deployment["status"] = self._status(deployment, new_rs, conditions, now)
        if (
            deployment["status"] != current.get("status")
            or deployment["metadata"] != current["metadata"]
        ):
            self._commit("deployments", deployment, "MODIFIED")

    def _set_progressing(
        self,
        key: tuple[str, str],
        conditions: list[Json],
        reason: str,
        message: str,
        now: float,
        *,
        status: str = "True",
        refresh: bool = False,
    ) -> None:
        """Set the Progressing condition; a True one written (re)starts the deadline clock."""
        written = _set_condition(
            conditions, "Progressing", status, reason, message, refresh=refresh
        )
        if written and status == "True":
            self._progress_marks[key] = now

    def _scale_up_new(self, spec: Json, new_rs: _ReplicaSet, all_sets: list[_ReplicaSet]) -> bool:
        """reconcileNewReplicaSet: grow the new ReplicaSet as far as maxSurge allows."""
        desired = spec["replicas"]
        if new_rs.replicas == desired:
            return False
        if new_rs.replicas > desired:
            new_rs.replicas = desired
            return True
        max_total = desired + _fenceposts(spec)[0]
        current = sum(rs.replicas for rs in all_sets)
        if current >= max_total:
            return False
        new_rs.replicas += min(max_total - current, desired - new_rs.replicas)
        return True

    def _scale_down_old(
        self, namespace: str, spec: Json, new_rs: _ReplicaSet, old_sets: list[_ReplicaSet]
    ) -> None:
        """reconcileOldReplicaSets: shrink old ReplicaSets as far as maxUnavailable allows.

        Unhealthy old pods go first (cleanupUnhealthyReplicas), then available ones while
        more than the minimum stay available (scaleDownOldReplicaSetsForRollingUpdate).
        """
        old_pods = sum(rs.replicas for rs in old_sets)
        if old_pods == 0:
            return
        available = {rs.name: self._available(namespace, rs) for rs in (*old_sets, new_rs)}
        min_available = spec["replicas"] - _max_unavailable(spec)
        new_unavailable = new_rs.replicas - available[new_rs.name]
        max_scaled_down = old_pods + new_rs.replicas - min_available - new_unavailable
        if max_scaled_down <= 0:
            return
        cleaned = 0
        for rs in old_sets:
            unhealthy = rs.replicas - available[rs.name]
            if cleaned >= max_scaled_down:
                break
            if rs.replicas == 0 or unhealthy <= 0:
                continue
            count = min(max_scaled_down - cleaned, unhealthy)
            rs.replicas -= count
            cleaned += count
        scale_down = sum(available.values()) - min_available
        for rs in old_sets:
            if scale_down <= 0:
                break
            count = min(rs.replicas, scale_down)
            rs.replicas -= count
            scale_down -= count

    def _roll_out_recreate(
        self, namespace: str, spec: Json, new_rs: _ReplicaSet, old_sets: list[_ReplicaSet]
    ) -> None:
        """rolloutRecreate: all old pods go, and only once they are gone do new ones come."""
        for rs in old_sets:
            rs.replicas = 0
        if not any(self._owned_pods(namespace, rs.name) for rs in old_sets):
            new_rs.replicas = spec["replicas"]

    def _sync_replica_set_pods(self, namespace: str, replica_set: _ReplicaSet, now: float) -> None:
        """The ReplicaSet controller: make or delete pods until they match its replicas."""
        pods = self._owned_pods(namespace, replica_set.name)
        for _ in range(replica_set.replicas - len(pods)):
            self._create_pod(namespace, replica_set, now)
        surplus = len(pods) - replica_set.replicas
        if surplus > 0:
            # controller.ActivePods ordering: pending before running, unready before ready,
            # more restarts before fewer, newer before older.
            def deletion_rank(pod: Json) -> tuple[bool, bool, int, float]:
                status = pod["status"]
                restarts = sum(c["restartCount"] for c in status.get("containerStatuses", []))
                life = self._pod_lives.get((namespace, pod["metadata"]["name"]))
                return (
                    status["phase"] == "Running",
                    _pod_ready(pod),
                    -restarts,
                    -(life.ready_at if life else 0.0),
                )

            for pod in sorted(pods, key=deletion_rank)[:surplus]:
                self._pod_lives.pop((namespace, pod["metadata"]["name"]), None)
                self._commit("pods", copy.deepcopy(pod), "DELETED")

    def _create_pod(self, namespace: str, replica_set: _ReplicaSet, now: float) -> None:
        index = self._pods_made
        self._pods_made += 1
        # The real ReplicaSet controller appends 5 random characters; these are derived from
        # a counter so that runs repeat.
        digest = hashlib.sha256(f"{replica_set.name}/{index}".encode()).digest()
        suffix = "".join(_NAME_ALPHABET[byte % len(_NAME_ALPHABET)] for byte in digest[:5])
        template = copy.deepcopy(replica_set.template)
        metadata = template.get("metadata") or {}
        pod_ip = f"10.244.{index // 250}.{index % 250 + 2}"
        pod: Json = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                **metadata,
                "name": f"{replica_set.name}-{suffix}",
                "generateName": f"{replica_set.name}-",
                "namespace": namespace,
                "uid": str(uuid.uuid4()),
                "labels": {
                    **(metadata.get("labels") or {}),
                    "pod-template-hash": replica_set.template_hash,
                },
                "ownerReferences": [
                    {
                        "apiVersion": "apps/v1",
                        "kind": "ReplicaSet",
                        "name": replica_set.name,
                        "uid": str(uuid.uuid5(uuid.NAMESPACE_OID, replica_set.name)),
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
                "creationTimestamp": _timestamp(),
            },
            "spec": {
                **template["spec"],
                "nodeName": self._nodes[index % len(self._nodes)],
            },
        }
        life = _PodLife(
            ready_at=now + self.ready_after_s,
            interval_s=self.ready_after_s,
            crashing=self._crash_predicate is not None
            and self._crash_predicate(copy.deepcopy(template["spec"]["containers"][0])),
            pod_ip=pod_ip,
            start_time=_timestamp(),
        )
        pod["status"] = _pod_status(pod, started=False, ready=False, start_time=life.start_time)
        self._pod_lives[(namespace, pod["metadata"]["name"])] = life
        self._commit("pods", pod, "ADDED")

    def _status(
        self, deployment: Json, new_rs: _ReplicaSet, conditions: list[Json], now: float
    ) -> Json:
        """calculateStatus and syncRolloutStatus: counts, Available and Progressing."""
        key = (deployment["metadata"]["namespace"], deployment["metadata"]["name"])
        spec, old_status = deployment["spec"], deployment.get("status") or {}
        actual = ready = wanted = updated = 0
        for rs in self._replica_sets[key]:
            pods = self._owned_pods(key[0], rs.name)
            actual += len(pods)
            ready += sum(map(_pod_ready, pods))
            wanted += rs.replicas
            if rs is new_rs:
                updated = len(pods)
        available = ready
        counts = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": actual,
            "updatedReplicas": updated,
            "readyReplicas": ready,
            "availableReplicas": available,
            "unavailableReplicas": max(wanted - available, 0),
        }
        status: Json = {k: v for k, v in counts.items() if v}
        if available >= spec["replicas"] - _max_unavailable(spec):
            _set_condition(
                conditions,
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
            )
        else:
            _set_condition(
                conditions,
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
            )

        progressing = _condition(conditions, "Progressing")
        finished = (
            actual == updated
            and progressing is not None
            and progressing["reason"] == "NewReplicaSetAvailable"
        )
        rs_name = _quote(new_rs.name)
        if _has_progress_deadline(spec) and not finished:
            if _rollout_complete({**deployment, "status": status}):
                message = f"ReplicaSet {rs_name} has successfully progressed."
                self._set_progressing(key, conditions, "NewReplicaSetAvailable", message, now)
            elif _made_progress(old_status, status):
                message = f"ReplicaSet {rs_name} is progressing."
                self._set_progressing(
                    key, conditions, "ReplicaSetUpdated", message, now, refresh=True
                )
            elif self._timed_out(key, spec, conditions, now):
                message = f"ReplicaSet {rs_name} has timed out progressing."
                self._set_progressing(
                    key, conditions, "ProgressDeadlineExceeded", message, now, status="False"
                )
        status["conditions"] = conditions
        return status

    def _timed_out(
        self, key: tuple[str, str], spec: Json, conditions: list[Json], now: float
    ) -> bool:
        """deploymentutil.DeploymentTimedOut, timed with the monotonic clock."""
        progressing = _condition(conditions, "Progressing")
        if progressing is None or progressing["reason"] == "NewReplicaSetAvailable":
            return False
        if progressing["reason"] == "ProgressDeadlineExceeded":
            return True
        since = self._progress_marks.get(key)
        return since is not None and now - since > spec["progressDeadlineSeconds"]


def _watch_event(change: _Change, resource: str, matches: Matcher) -> Json | None:
    """The event a watch with this selector sees for a change, if any (cacheWatcher)."""
    if change.resource != resource:
        return None
    matches_now = matches(change.object)
    if change.type == "MODIFIED" and change.previous is not None:
        matched_before = matches(change.previous)
        if matched_before and not matches_now:
            # The object left the selection: DELETED with its last state at this version.
            gone = copy.deepcopy(change.previous)
            gone["metadata"]["resourceVersion"] = str(change.resource_version)
            return {"type": "DELETED", "object": gone}
        if matches_now and not matched_before:
            return {"type": "ADDED", "object": change.object}
    return {"type": change.type, "object": change.object} if matches_now else None
