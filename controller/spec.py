"""The job spec: what a user submits (YAML or JSON), validated at the edge with pydantic.

Every section rejects unknown fields by name, and types are strict at this edge: an
integer field takes an integer, not `true`, `"4"` or YAML's `yes` (`JobCreate` validates
in pydantic's strict mode, nested sections included). Paths are checked as the
filesystem will see them: valid UTF-8, at most 4096 bytes, no component over 255 bytes.
YAML files are read with controller.safe_yaml (no aliases, bounded depth and size, no
duplicate keys). The spec is resolved lazily: a model preset, a
Hugging Face model directory or `config.json` path and a cluster preset become
`ModelSpec`/`ClusterSpec` only when the planner needs them (`resolve_model`,
`resolve_cluster`), so a spec stays small and stable in the store (and parses on a client
that cannot see the server's paths). `validate_model` reads a model directory at submit,
torch-free (config.json and the weights' headers), so a bad checkpoint is refused then,
naming the field. `JobCreate` is the REST body and the file format; `load_job_spec` reads
a file.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    ModelWrapValidatorHandler,
    StringConstraints,
    Tag,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from controller.safe_yaml import YamlError, load_yaml, one_line
from controller.spec_kubernetes import KubernetesOverrides
from controller.spec_objective import Objective, PretrainObjective
from scheduler.errors import DatasetError, SpecError
from scheduler.hf_checkpoint import has_weights, inspect_checkpoint
from scheduler.model_states import (
    OptimizerSharding,
    Precision,
    default_precision,
    default_sharding,
)
from scheduler.rope import DefaultRope, RopeSetting
from scheduler.specs import (
    CLUSTER_PRESETS,
    MODEL_PRESETS,
    ClusterSpec,
    ModelSpec,
    cluster_preset,
    format_validation_error,
    model_preset,
)

NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SUBMISSION_ID_PATTERN = r"^[A-Za-z0-9._:-]+$"
PATH_PATTERN = r"^[^\x00]*[^\x00\s][^\x00]*$"  # not blank, no NUL
MAX_PATH_CHARS = 4096
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux
MAX_NAME_BYTES = 255  # NAME_MAX: one path component
MAX_ERROR_CHARS = 2000  # a spec error is one line, never a dump of the input


def check_path(value: str) -> str:
    """A path the filesystem can take: UTF-8, <= 4096 bytes, components <= 255 bytes."""
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError("is not valid UTF-8 (a lone surrogate)") from None
    if len(raw) > MAX_PATH_BYTES:
        raise SpecError(f"is {len(raw)} bytes long; a path may have at most "
                        f"{MAX_PATH_BYTES}")
    for part in raw.split(b"/"):
        if len(part) > MAX_NAME_BYTES:
            shown = part[:24].decode("utf-8", "replace")
            raise SpecError(f"has a component of {len(part)} bytes ({shown!r}...); a file "
                            f"name may have at most {MAX_NAME_BYTES}")
    return value


if TYPE_CHECKING:  # the preset names are known at run time: the checker sees a str
    ModelPreset = str
    ClusterPreset = str
else:
    ModelPreset = Literal[tuple(MODEL_PRESETS)]
    ClusterPreset = Literal[tuple(CLUSTER_PRESETS)]
PathStr = Annotated[str, StringConstraints(pattern=PATH_PATTERN, min_length=1,
                                           max_length=MAX_PATH_CHARS),
                    AfterValidator(check_path)]


def _kind(value: object) -> str:
    """Which form a model reference takes: a preset name, a path (model directory or
    config.json), a source with overrides, or explicit ModelSpec fields."""
    if isinstance(value, dict):
        return "source" if "source" in value else "spec"
    if isinstance(value, ModelSource):
        return "source"
    if isinstance(value, BaseModel):
        return "spec"
    return "path" if isinstance(value, str) and _is_path(value) else "preset"


def _is_path(value: str) -> bool:
    return value.endswith(".json") or "/" in value


# A model directory or config.json: contains '/' or ends in .json (so no preset name is a
# path, and the JSON Schema's oneOf stays unambiguous).
ModelPath = Annotated[str, StringConstraints(pattern=r"^[^\x00]*(/[^\x00]*|\.json)$",
                                             max_length=MAX_PATH_CHARS),
                      AfterValidator(check_path)]


class ModelSource(BaseModel):
    """A preset or Hugging Face model directory with its RoPE settings changed: how a job
    extends a checkpoint's context (docs/models.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: PathStr = Field(description="Model preset or Hugging Face model directory (or "
                                        "config.json path) to start from.")
    rope_theta: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                     description="Replaces the RoPE base frequency.")
    rope_scaling: RopeSetting | None = Field(
        default=None, description="Replaces the RoPE scaling: linear, llama3, yarn, or "
                                  "{rope_type: default} for none.")
    max_position_embeddings: int | None = Field(
        default=None, gt=0, description="The context length written to exported configs.")

    def overrides(self) -> dict:
        """The ModelSpec fields this source replaces."""
        out: dict = {}
        if self.rope_theta is not None:
            out["rope_theta"] = self.rope_theta
        if self.rope_scaling is not None:
            out["rope_scaling"] = None if isinstance(self.rope_scaling, DefaultRope) \
                else self.rope_scaling.model_dump()
        if self.max_position_embeddings is not None:
            out["max_position_embeddings"] = self.max_position_embeddings
        return out


ModelRef = Annotated[
    Annotated[ModelPreset, Tag("preset")] | Annotated[ModelPath, Tag("path")]
    | Annotated[ModelSource, Tag("source")] | Annotated[ModelSpec, Tag("spec")],
    Discriminator(_kind)]
ClusterRef = Annotated[
    Annotated[ClusterPreset, Tag("preset")] | Annotated[ClusterSpec, Tag("spec")],
    Discriminator(lambda v: "spec" if isinstance(v, dict | BaseModel) else "preset")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetRef(_Section):
    """Where the token dataset (.bin/.idx, see scheduler.dataset) lives."""

    path: PathStr = Field(description="Dataset prefix or directory holding data.bin/data.idx, "
                                      "as the controller and the workers see it.")


class Resources(_Section):
    """How many ranks the job runs on and what hardware they are."""

    num_ranks: int = Field(ge=1, le=1_000_000, description="Ranks (GPUs, or CPU processes).")
    cluster: ClusterRef = Field(
        default="cpu",
        description=f"Cluster preset ({', '.join(CLUSTER_PRESETS)}) or explicit ClusterSpec "
                    "fields.")
    gpus_per_node: int | None = Field(default=None, ge=1, le=1024,
                                      description="Override the preset's ranks per node.")
    capacity_tokens: int | None = Field(
        default=None, ge=1, le=1 << 40,
        description="Tokens one rank holds per micro-batch; default: the planner derives it "
                    "from the model and the device memory.")
    kubernetes: KubernetesOverrides | None = Field(
        default=None,
        description="Per-job steering of the KubeRay pods (node selector, tolerations, "
                    "affinity, priority class, /dev/shm, env, extended resources, service "
                    "account, Kueue queue); kuberay launcher only. See docs/api.md.")

    @model_validator(mode="after")
    def _fits(self) -> Resources:
        if isinstance(self.cluster, str):
            cluster_preset(self.cluster, num_ranks=self.num_ranks,
                           gpus_per_node=self.gpus_per_node)
        else:
            if self.gpus_per_node is not None:
                raise SpecError("gpus_per_node: only applies to a cluster preset; set "
                                "cluster.gpus_per_node instead")
            if self.num_ranks != self.cluster.world_size:
                raise SpecError(f"num_ranks={self.num_ranks} must equal the cluster's "
                                f"{self.cluster.world_size} ranks (num_nodes x gpus_per_node)")
        return self


class Training(_Section):
    """The training loop's settings."""

    steps: int = Field(ge=1, le=10_000_000, description="Optimizer steps to run.")
    global_batch_tokens: int = Field(ge=1, le=1 << 40,
                                     description="Token budget of one global batch.")
    learning_rate: float = Field(default=1e-3, gt=0, le=10, allow_inf_nan=False,
                                 description="Peak AdamW learning rate.")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="Data order and init seed.")
    checkpoint_dir: PathStr | None = Field(default=None,
                                           description="Where checkpoints go; none: no "
                                                       "checkpoints.")
    checkpoint_interval: int = Field(default=100, ge=1, le=10_000_000,
                                     description="Steps between checkpoints.")
    resume_from: PathStr | None = Field(
        default=None,
        description="Continue another run: a checkpoint directory (its newest complete "
                    "step_<n>) or one step_<n> directory. The job restores model, optimizer, "
                    "RNG and data position and trains on to `steps`. Naming a checkpoint_dir "
                    "another job owns here is how a job may take it over (docs/api.md).")
    tensorboard_dir: PathStr | None = Field(
        default=None,
        description="Write TensorBoard event files here (rank 0: loss, tokens/s, step time, "
                    "peak memory, learning rate, gradient norm per step); none: no events.")
    precision: Precision | None = Field(
        default=None,
        description="bf16-mixed: bfloat16 compute, float32 master weights, gradients and "
                    "AdamW moments; fp32; fp64 (exactness checks). Default: fp32 on the cpu "
                    "cluster preset, bf16-mixed on GPU clusters. See docs/precision.md.")
    optimizer_sharding: OptimizerSharding | None = Field(
        default=None,
        description="Where AdamW's masters and moments live: none (every rank), zero1 "
                    "(whole tensors per owner rank), distributed (contiguous shards, "
                    "reduce-scatter + all-gather). Default: distributed on more than one "
                    "rank. See docs/precision.md.")


class PlannerSettings(_Section):
    """How each global batch is planned (scheduler.plan_batch)."""

    policy: Literal["hdp", "naive", "static"] = Field(
        default="hdp", description="hdp: balanced dynamic mesh; naive: ByteScale Alg. 1 "
                                   "without balancing; static: one CP degree for all.")
    time_limit_s: float = Field(default=1.0, gt=0, le=600, allow_inf_nan=False,
                                description="Solver time budget per global batch, seconds.")


class FailurePolicy(_Section):
    """What happens when a worker dies or stalls (docs/elastic.md)."""

    max_restarts: int = Field(default=3, ge=0, le=1000,
                              description="Attempts after the first before the job fails.")
    heartbeat_timeout_s: float = Field(default=60.0, gt=0, le=86_400, allow_inf_nan=False,
                                       description="A rank silent this long is lost; also "
                                                   "the longest wait of one collective.")
    mode: Literal["replan", "restart"] = Field(
        default="replan",
        description="replan: a lost rank costs one step: the survivors re-plan the same "
                    "batch and go on, a replacement rejoins at a step boundary; restart: "
                    "every rank restarts from the last checkpoint.")
    shard_mirror: bool = Field(
        default=True,
        description="replan with the distributed optimizer: each rank also keeps the "
                    "previous rank's optimizer shard, so a lost rank's shard survives "
                    "(costs that shard's masters and moments per rank, and one gradient "
                    "shard of traffic per step). Off: lost shards come back from the last "
                    "checkpoint.")
    max_lost_ranks: int = Field(
        default=1, ge=1, le=1_000_000,
        description="replan: the most ranks the job may be short of resources.num_ranks "
                    "and go on; one more lost restarts it from the last checkpoint.")



class JobCreate(_Section):
    """A job as submitted (file format and body of POST /v1/jobs)."""

    name: str = Field(min_length=1, max_length=63, pattern=NAME_PATTERN,
                      description="DNS-label name (lowercase letters, digits, '-').")
    submission_id: str | None = Field(
        default=None, min_length=1, max_length=128, pattern=SUBMISSION_ID_PATTERN,
        description="Client-chosen idempotency key: resubmitting the same body returns the "
                    "same job; a different body with the same key is a conflict (409).")
    model: ModelRef = Field(
        description=f"Model preset ({', '.join(MODEL_PRESETS)}), a Hugging Face model "
                    "directory (a path with '/'; config.json and safetensors weights), a path "
                    "to a config.json, {source: <preset or directory>, rope_theta, "
                    "rope_scaling} to extend context, or explicit ModelSpec fields.")
    model_init: Literal["pretrained", "random"] | None = Field(
        default=None,
        description="Start from the model directory's weights (pretrained) or a random init "
                    "(random); default: pretrained when the directory has weights.")
    dataset: DatasetRef
    resources: Resources
    training: Training
    objective: Objective = Field(
        default=PretrainObjective(),
        description="What the step optimises: {type: pretrain} (every token), {type: sft} "
                    "(the dataset's loss targets), {type: dpo, beta, label_smoothing} or "
                    "{type: grpo, clip_range, kl_coef, loss_normalization}. See "
                    "docs/objectives.md.")
    planner: PlannerSettings = PlannerSettings()
    failure: FailurePolicy = FailurePolicy()

    @model_validator(mode="wrap")
    @classmethod
    def _strict(cls, data: object, handler: ModelWrapValidatorHandler[Self],
                info: ValidationInfo) -> Self:
        """Validate in strict mode however we are called (FastAPI validates bodies in lax
        mode): no bool, string or float is coerced into an int, nested sections included."""
        if not isinstance(data, dict) or (info.context or {}).get("_strict"):
            return handler(data)
        return cls.__pydantic_validator__.validate_python(data, strict=True,
                                                          context={"_strict": True})

    def fingerprint(self) -> str:
        """Hash of the canonical JSON form: equal bodies, equal fingerprints."""
        canon = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()

    def resolve_model(self) -> ModelSpec:
        """The ModelSpec (reads config.json when `model` is a path), overrides applied."""
        if isinstance(self.model, ModelSpec):
            return self.model
        if isinstance(self.model, ModelSource):
            return _resolve_name(self.model.source).with_overrides(**self.model.overrides())
        return _resolve_name(self.model)

    def model_dir(self) -> str | None:
        """The Hugging Face model directory the job starts from, if `model` names one."""
        ref = self.model.source if isinstance(self.model, ModelSource) else self.model
        if isinstance(ref, str) and _is_path(ref) and not ref.endswith(".json"):
            return ref
        return None

    def resolve_model_init(self) -> Literal["pretrained", "random"]:
        """model_init with its default filled in (looks at the model directory)."""
        directory = self.model_dir()
        weights = directory is not None and has_weights(directory)
        if self.model_init is None:
            return "pretrained" if weights else "random"
        if self.model_init == "pretrained" and not weights:
            what = f"directory {directory!r} has none" if directory else \
                "it is not a model directory"
            raise SpecError(f"model_init='pretrained' needs a model directory with weights "
                            f"(model.safetensors or model.safetensors.index.json); {what}; "
                            "use model_init='random' to train from scratch")
        return self.model_init

    def resolve_cluster(self) -> ClusterSpec:
        """The ClusterSpec the planner sees: a preset sized to `num_ranks`, or the fields."""
        r = self.resources
        if isinstance(r.cluster, ClusterSpec):
            return r.cluster
        return cluster_preset(r.cluster, num_ranks=r.num_ranks, gpus_per_node=r.gpus_per_node)

    def resolve_precision(self) -> Precision:
        """training.precision, or its default for the cluster (fp32 on the cpu preset and on
        pools that are all of the cpu preset)."""
        if self.training.precision is not None:
            return self.training.precision
        c = self.resources.cluster
        cpu = c == "cpu" if isinstance(c, str) else \
            c.pools is not None and all(p.gpu == "cpu" for p in c.pools)
        return default_precision("cpu" if cpu else "cuda")

    def resolve_optimizer_sharding(self) -> OptimizerSharding:
        """training.optimizer_sharding, or distributed on more than one rank."""
        return self.training.optimizer_sharding or default_sharding(self.resources.num_ranks)

    @model_validator(mode="after")
    def _zero1_fits(self) -> JobCreate:
        """zero1 gives every rank whole tensors: it needs at least one tensor per rank.

        Checked here for presets and explicit specs; a config.json path is read by the
        workers, which refuse the same way before training."""
        if self.training.optimizer_sharding != "zero1" or isinstance(self.model, str) \
                and self.model.endswith(".json"):
            return self
        num_tensors = len(self.resolve_model().parameter_numels())
        if num_tensors < self.resources.num_ranks:
            raise SpecError(f"training.optimizer_sharding='zero1' needs a parameter tensor per "
                            f"rank, but the model has {num_tensors} tensors for num_ranks="
                            f"{self.resources.num_ranks}; use 'distributed' or 'none'")
        return self

    @model_validator(mode="after")
    def _failure_fits(self) -> JobCreate:
        """failure.* settings that would do nothing, or could never hold, are refused.

        (Checked on values, not on which fields were sent: the stored spec carries every
        default.) shard_mirror's default, on, mirrors only what has shards to mirror: the
        distributed optimizer on more than one rank."""
        f, n = self.failure, self.resources.num_ranks
        if f.mode == "restart":
            for name, default in (("shard_mirror", True), ("max_lost_ranks", 1)):
                if getattr(f, name) != default:
                    raise ValueError(f"failure.{name}={getattr(f, name)!r}: only used by "
                                     "failure.mode='replan' (this job restarts every rank "
                                     "on a loss); remove it")
        elif f.max_lost_ranks > 1 and f.max_lost_ranks >= n:
            raise ValueError(f"failure.max_lost_ranks={f.max_lost_ranks} must be below "
                             f"resources.num_ranks={n} (at least one rank must be left)")
        return self

    def resolve_shard_mirror(self) -> bool:
        """Whether the workers keep shard mirrors (replan, distributed, > 1 rank)."""
        f = self.failure
        return (f.mode == "replan" and f.shard_mirror and self.resources.num_ranks > 1
                and self.resolve_optimizer_sharding() == "distributed")

    @property
    def num_nodes(self) -> int:
        c = self.resolve_cluster()
        return math.ceil(self.resources.num_ranks / c.gpus_per_node)


def _resolve_name(name: str) -> ModelSpec:
    if _is_path(name) and not name.endswith(".json") and not Path(name).is_dir():
        raise SpecError(f"model={name!r}: no such model directory (give a path the controller "
                        "and the workers see, or a preset)")
    try:
        return model_preset(name)
    except (OSError, UnicodeDecodeError) as exc:  # a directory named *.json, no permission
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise SpecError(f"model={name!r}: cannot read it ({reason})") from None


def validate_model(spec: JobCreate) -> ModelSpec:
    """Submit-time checks of `model` and `model_init` on the controller's filesystem: the
    config.json is read (anything not implemented is refused by name), the weights' headers
    are checked against it, and a sliding window is held against the dataset's longest
    sequence. Raises SpecError prefixed with the field."""
    try:
        model = spec.resolve_model()
        if spec.resolve_model_init() == "pretrained":
            directory = spec.model_dir()
            assert directory is not None, "pretrained means a model directory with weights"
            inspect_checkpoint(directory, model)
    except SpecError as exc:
        raise SpecError(f"model: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:  # unreadable weights: the user's to fix
        reason = getattr(exc, "strerror", None) or type(exc).__name__
        raise SpecError(f"model: cannot read {spec.model_dir()!r} ({reason})") from None
    longest = _longest_sequence(spec.dataset.path) if model.sliding_window else None
    if longest is not None:
        try:
            model.check_sequence_length(longest, where=f"dataset {spec.dataset.path}: the "
                                                       "longest sequence")
        except SpecError as exc:
            raise SpecError(f"model: {exc}") from None
    return model


def _longest_sequence(dataset: str) -> int | None:
    """The dataset's longest sample, or None when its index cannot be read here (the
    dataset's own checks report that)."""
    from scheduler.dataset import read_lengths

    try:
        lengths = read_lengths(dataset)
    except (DatasetError, OSError, ValueError):
        return None
    return int(lengths.max()) if len(lengths) else None


def parse_job_spec(data: object, *, source: str = "job spec") -> JobCreate:
    """Validate a decoded document; SpecError lists every bad field as 'path: message'."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping of job fields, got "
                        f"{type(data).__name__}")
    try:
        return JobCreate.model_validate(data)
    except ValidationError as exc:
        raise SpecError(one_line(f"invalid {source}: {format_validation_error(exc)}",
                                 MAX_ERROR_CHARS)) from None


def load_job_spec(path: str | Path) -> JobCreate:
    """Read a job spec from a .yaml/.yml/.json file (at most 1 MiB)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_SPEC_BYTES:
            raise SpecError(f"job spec {path}: over {MAX_SPEC_BYTES} bytes; a job spec is a "
                            "few hundred")
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"job spec {path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(one_line(f"job spec {path}: cannot read ({exc})")) from None
    try:
        data = _decode_json(text) if path.suffix == ".json" else load_yaml(text)
    except (ValueError, RecursionError) as exc:  # YamlError, JSON errors
        kind = path.suffix.lstrip(".") or "YAML"
        raise SpecError(one_line(f"job spec {path}: not valid {kind} ({exc})")) from None
    return parse_job_spec(data, source=f"job spec {path}")


MAX_SPEC_BYTES = 1 << 20


def _decode_json(text: str) -> object:
    """json.loads without NaN/Infinity and with duplicate keys refused."""
    def pairs(items: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for key, value in items:
            if key in out:
                raise YamlError(f"duplicate key {key[:60]!r}")
            out[key] = value
        return out

    def constant(name: str) -> object:
        raise YamlError(f"{name} is not a JSON number")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except RecursionError:
        raise YamlError("nested too deeply") from None


def inline_local_model(spec: JobCreate, *, base: Path | None = None) -> JobCreate:
    """Replace a config.json path with its ModelSpec, read on the client's filesystem."""
    if not isinstance(spec.model, str) or not spec.model.endswith(".json"):
        return spec
    path = Path(spec.model)
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.exists():
        return spec  # the server resolves it against its own filesystem
    return spec.model_copy(update={"model": ModelSpec.from_hf_config(path)})
