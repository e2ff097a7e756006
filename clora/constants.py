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
REASON_DATASET_TOO_LARGE = "DatasetTooLarge"  # a ConfigMap dataset over MAX_DATASET_TEXT_BYTES
REASON_PUBLISHED = "Published"
REASON_PUBLISH_FAILED = "PublishFailed"
REASON_MISSING_SECRET = "MissingSecret"  # spec.task.verifier.tokenSecret not (yet) there
REASON_RUNTIME_LOST = "RuntimeLost"
REASON_TOKEN_BUDGET_TOO_HIGH = "TokenBudgetAboveTokensPerTick"
REASON_RUNTIME_REJECTED = "RuntimeRejected"
REASON_DELETED = "Deleted"
REASON_WAITING_FOR_KUEUE = "WaitingForKueue"
# A LoRARuntime the operator refuses to build pods for (its Ready condition says which field).
REASON_HOST_PATH_NOT_ALLOWED = "HostPathNotAllowed"
REASON_IMAGE_NOT_ALLOWED = "ImageNotAllowed"
REASON_SECRET_NOT_OWNED = "TokenSecretNotOwned"

# What the operator puts on the runtime pods and Secrets it creates (LABEL_COMPONENT / LABEL_MANAGED_BY).
COMPONENT_RUNTIME = "runtime"
MANAGED_BY = "clora"
# Hash of the pod template a runtime pod was built from: a changed LoRARuntime spec replaces the pod.
ANNOTATION_POD_TEMPLATE_HASH = f"{GROUP}/pod-template-hash"

# Input limits (issue 17): the CRD schemas (maxLength, maxItems, maxProperties) and the checks of
# the operator and the runtime all read them from here; docs/security.md lists them.
MAX_NAME_LENGTH = 253
"""A Kubernetes object name (DNS-1123 subdomain): a LoRARuntime, ConfigMap, Secret, PVC, node."""
MAX_LABEL_LENGTH = 63
"""A DNS-1123 label (a namespace, an aibrix ModelAdapter) and a label value."""
# The patterns match the empty string too: minLength says "must not be empty", once.
DNS_SUBDOMAIN_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*)?$"
"""A Kubernetes object name: no slash, no '..', so it can never address another namespace or kind."""
DNS_LABEL_PATTERN = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?)?$"
DATA_KEY_PATTERN = r"^[-._a-zA-Z0-9]*$"
"""A key of a ConfigMap's or Secret's data."""
MAX_SYSTEM_PROMPT_CHARS = 16384
"""spec.task.systemPrompt, in characters (the runtime also bounds prompts by it)."""
MAX_PATH_LENGTH = 4096
"""A file or directory path (dataset, mount path, hostPath, checkpoint paths in status)."""
MAX_MODEL_NAME_LENGTH = 512
"""spec.baseModel of a LoRARuntime: a Hugging Face id, a path or a built-in name."""
MAX_IMAGE_LENGTH = 512
"""A container image reference."""
MAX_URL_LENGTH = 2048
MAX_SHORT_TEXT = 256
"""Short free text: a toleration's key and value, a hostPath type."""
MAX_MESSAGE_LENGTH = 32768
"""A status or condition message (as metav1.Condition); the operator cuts longer ones."""
MAX_REASON_LENGTH = 1024
MAX_MAP_ENTRIES = 64
"""Entries of a string map (nodeSelector, podSelector, resources) and items of a short list."""
MAX_TARGET_MODULES = 64
"""Module names in spec.lora.targetModules."""
MAX_MODULE_NAME_LENGTH = 128
MAX_DATASET_TEXT_BYTES = 1_048_576
"""A ConfigMap dataset's value, which the operator sends in the runtime PUT (datasetText)."""
OPERATOR_RECURSION_LIMIT = 31000
"""The operator's Python recursion limit. The API server decodes JSON up to 10000 levels deep; kopf
decodes every watched object with Python's json (one recursion level per nesting level) and walks it
(deepcopy: two per level). The default limit (1000) let one deep object crash the operator's watcher
for every namespace; 10000 levels need well under the 8 MiB default stack."""

# Runtime pods (operator/clora_operator/pods.py). Their root filesystem is read-only; these emptyDirs
# are what the runtime writes, each with a sizeLimit (the kubelet evicts a pod that goes beyond it).
RUNTIME_TMP_SIZE_LIMIT = "4Gi"
"""/tmp: Ray's session files, torch.compile's and Triton's scratch files."""
RUNTIME_HOME_SIZE_LIMIT = "1Gi"
"""$HOME (/home/clora): small per-user caches and configs libraries write there."""
RUNTIME_MODEL_CACHE_SIZE_LIMIT = "100Gi"
"""/var/cache/clora: downloaded and converted base models, vLLM, Triton and inductor caches."""
RUNTIME_CHECKPOINT_EMPTYDIR_SIZE_LIMIT = "20Gi"
"""The checkpoint emptyDir of a LoRARuntime with no checkpoint volume source and no sizeLimit."""
DEFAULT_RUNTIME_MEMORY_LIMIT = "32Gi"
"""The runtime container's memory limit when its LoRARuntime sets none (raised to the memory request
when that is larger); set resources.limits.memory to choose another."""
