"""Every API group name, label, annotation, finalizer, condition type and event reason, in one place."""

from __future__ import annotations

GROUP = "clora.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

RUNTIME_KIND = "LoRARuntime"
RUNTIME_PLURAL = "loraruntimes"
RUNTIME_SHORT = "lrt"
EXPERIMENT_KIND = "LoRAExperiment"
EXPERIMENT_PLURAL = "loraexperiments"
EXPERIMENT_SHORT = "lx"
CATEGORY = "clora"

FINALIZER = f"{GROUP}/cleanup"

# Labels and annotations the operator puts on what it creates.
LABEL_RUNTIME = f"{GROUP}/runtime"
LABEL_NODE = f"{GROUP}/node"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"

# The runtime pod's HTTP port and where the bearer token lies in its Secret.
RUNTIME_PORT = 8080
TOKEN_ENV = "CLORA_RUNTIME_TOKEN"
TOKEN_FILE_ENV = "CLORA_RUNTIME_TOKEN_FILE"
TOKEN_SECRET_KEY = "token"

# Condition types (LoRAExperiment).
COND_ADMITTED = "Admitted"
COND_SCHEDULED = "Scheduled"
COND_RUNNING = "Running"
COND_CHECKPOINTED = "Checkpointed"
COND_PUBLISHED = "Published"  # only with spec.publish
COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"
EXPERIMENT_CONDITION_TYPES = (
    COND_ADMITTED,
    COND_SCHEDULED,
    COND_RUNNING,
    COND_CHECKPOINTED,
    COND_SUCCEEDED,
    COND_FAILED,
)
# Condition types (LoRARuntime).
COND_READY = "Ready"
COND_DEGRADED = "Degraded"

# Event reasons.
REASON_ADMITTED = "Admitted"
REASON_QUEUED = "Queued"
REASON_SCHEDULED = "Scheduled"
REASON_RUNNING = "Running"
REASON_CHECKPOINTED = "Checkpointed"
REASON_PREEMPTED = "Preempted"
REASON_RESUMED = "ResumedFromCheckpoint"
REASON_SUSPENDED = "Suspended"
REASON_SUCCEEDED = "Succeeded"
REASON_FAILED = "Failed"
REASON_INVALID = "InvalidSpec"
REASON_UNKNOWN_RUNTIME = "UnknownRuntime"
REASON_RANK_TOO_HIGH = "RankAboveMaxRank"
REASON_MISSING_DATASET = "MissingDataset"
REASON_PUBLISHED = "Published"
REASON_PUBLISH_FAILED = "PublishFailed"
REASON_MISSING_SECRET = "MissingSecret"  # spec.task.verifier.tokenSecret not (yet) there
REASON_RUNTIME_LOST = "RuntimeLost"
REASON_TOKEN_BUDGET_TOO_HIGH = "TokenBudgetAboveTokensPerTick"
REASON_RUNTIME_REJECTED = "RuntimeRejected"
REASON_DELETED = "Deleted"
REASON_WAITING_FOR_KUEUE = "WaitingForKueue"

# What the operator puts on the runtime pods and Secrets it creates (LABEL_COMPONENT / LABEL_MANAGED_BY).
COMPONENT_RUNTIME = "runtime"
MANAGED_BY = "clora"
# Hash of the pod template a runtime pod was built from: a changed LoRARuntime spec replaces the pod.
ANNOTATION_POD_TEMPLATE_HASH = f"{GROUP}/pod-template-hash"
