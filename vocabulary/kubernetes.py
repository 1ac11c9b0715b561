"""The names wattops reads and writes on Kubernetes objects, shared by the agent's cluster
mode and the fleet core's discovery, scaling and rollouts."""

from __future__ import annotations

import os

#: The label that makes a Deployment (and its pods) part of the wattops fleet.
PART_OF_SELECTOR = "app.kubernetes.io/part-of=wattops"
#: The label of the agent DaemonSet's pods.
AGENT_SELECTOR = "app.kubernetes.io/name=wattops-agent"
#: The env var of an engine pod's first container that names its precision.
PRECISION_ENV = "WATTOPS_PRECISION"
#: Shown when a pod does not name its precision.
UNKNOWN_PRECISION = "unknown"
#: Container waiting reasons that mean the pod will not become ready by itself.
STUCK_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "CreateContainerError",
        "CreateContainerConfigError",
        "InvalidImageName",
    }
)


def kubeconfig_path() -> str:
    """The kubeconfig kubectl would read: `$KUBECONFIG` (a list of paths is merged), else
    ~/.kube/config. Read at each call: the client fixes its own default at import time."""
    return os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
