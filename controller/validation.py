"""One validation of a job spec, shared by `POST /v1/jobs` and `POST /v1/jobs:plan`.

Everything the controller can know about a job before any worker starts is checked here,
in this order, and the first failure is a 422 naming the field (a `FieldError`, or a
`SpecError` whose message starts with the field):

1. `dataset.path`: the dataset opens (index header and offsets, `.bin`, `.mask`, `.meta`
   and column sizes consistent with the index, metadata records valid) and holds samples.
2. `model`: the config is one we implement and the weights' headers match it
   (controller.spec.validate_model), and the model's states (for the job's precision and
   optimizer sharding) fit one device (controller.planning.check_job_fits, the planner's
   memory model).
3. `dataset.path` against `model`: the largest token id is below `vocab_size`. The id is
   the one the importer recorded in the dataset's manifest (`max_token_id`, trusted when
   its `num_tokens` matches the index), else one memory-mapped pass over `.bin` in chunks
   of 16 Mi tokens (bounded memory, any size; scheduler.dataset.TokenDataset.max_token_id).
   Workers check every sample they read as well, so a dataset changed after submit still
   ends the job as InvalidInput, not as a retried crash.
4. `resources`: what the launcher can run (its capacity: a job larger than the local
   machine or the configured maximum is refused, not left Pending forever).
5. `training.resume_from` names a complete checkpoint, before `training.steps`.
6. `training.checkpoint_dir`: not holding another job's checkpoints
   (scheduler.checkpoint_owner), and not the checkpoint_dir of another active job (the
   store's index of directories in use; a job not yet started has written no owner record).

Validation reads only indexes, headers and small records (and the token scan of step 3
for datasets without a manifest); it never plans.
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.edge import FieldError
from controller.spec import JobCreate, validate_model
from controller.spec_objective import check_objective
from controller.store import CheckpointDirInUse
from scheduler.checkpoint_owner import Checkpoint, claim_conflict, resolve_resume
from scheduler.errors import DatasetError, SpecError
from scheduler.specs import ModelSpec


@dataclass(frozen=True, kw_only=True)
class ValidatedJob:
    """What validation learned on the way (reused by the caller instead of re-reading)."""

    model: ModelSpec
    num_samples: int
    max_token_id: int
    resume: Checkpoint | None  # the checkpoint training.resume_from names, resolved


def validate_job(spec: JobCreate, *, launcher=None, store=None) -> ValidatedJob:
    """Raise a FieldError/SpecError (a 422) or CheckpointDirInUse (a 409) for the first
    thing wrong with `spec`; see the module docstring. `launcher` and `store` are optional
    (a preview on a client has neither)."""
    num_samples, max_token_id = check_dataset(spec)
    check_objective(spec.objective, spec.dataset.path)  # e.g. dpo on a dataset without pairs
    model = validate_model(spec)
    check_states_fit(spec)
    check_vocab(spec, model, max_token_id)
    if launcher is not None:
        launcher.check_spec(spec)
    resume = check_resume(spec)
    check_checkpoint_dir(spec, store)
    return ValidatedJob(model=model, num_samples=num_samples, max_token_id=max_token_id,
                        resume=resume)


def check_dataset(spec: JobCreate) -> tuple[int, int]:
    """(samples, largest token id) of a dataset that opens and is self-consistent."""
    from scheduler.dataset import TokenDataset

    path = spec.dataset.path
    try:
        ds = TokenDataset(path)
        ds.structure.validate(f"{ds.prefix}.meta")
        if len(ds) == 0:
            raise DatasetError(f"{ds.idx_path}: holds no samples")
        return len(ds), ds.max_token_id
    except DatasetError as exc:
        raise FieldError("dataset.path", f"{path!r}: {exc}") from None
    except (OSError, ValueError) as exc:  # a directory where a file should be, no access
        reason = getattr(exc, "strerror", None) or str(exc)
        raise FieldError("dataset.path", f"{path!r}: cannot read it ({reason})") from None


def check_states_fit(spec: JobCreate) -> None:
    """The planner's memory refusal (DeviceMemoryError: model states beyond one device).
    Figures the cost model cannot compute with (a 1e300 GiB GPU) are the spec's fault."""
    from controller.planning import check_job_fits

    try:
        check_job_fits(spec)
    except ArithmeticError as exc:
        raise SpecError(f"model/resources.cluster: figures out of the range the cost model "
                        f"can compute with ({type(exc).__name__}: {exc})") from None


def check_vocab(spec: JobCreate, model: ModelSpec, max_token_id: int) -> None:
    if max_token_id >= model.vocab_size:
        raise FieldError("dataset.path", f"{spec.dataset.path!r} holds token id "
                                         f"{max_token_id}, but the model's vocab_size is "
                                         f"{model.vocab_size} (valid ids 0..{model.vocab_size - 1}"
                                         "); tokenize with the model's tokenizer")


def check_resume(spec: JobCreate) -> Checkpoint | None:
    """The checkpoint `training.resume_from` names, with steps left to train after it."""
    training = spec.training
    if not training.resume_from:
        return None
    try:
        found = resolve_resume(training.resume_from)
    except SpecError as exc:
        raise FieldError("training.resume_from", str(exc)) from None
    if found.step >= training.steps:
        raise FieldError("training.steps", f"{training.steps} leaves nothing to train after "
                                           f"training.resume_from's checkpoint at step "
                                           f"{found.step} ({found.path}); raise it")
    return found


def check_checkpoint_dir(spec: JobCreate, store=None) -> None:
    """CheckpointDirInUse when another job's checkpoints, or another active job, hold
    `training.checkpoint_dir` (see the module docstring)."""
    directory = spec.training.checkpoint_dir
    if not directory:
        return
    why = claim_conflict(directory, job_id=None, resume_from=spec.training.resume_from)
    if why is not None:
        raise CheckpointDirInUse(why)
    user = store.checkpoint_dir_user(directory) if store is not None else None
    if user is not None:  # store.create checks again, atomically
        raise CheckpointDirInUse(f"{directory!r} is the checkpoint_dir of job {user}, which "
                                 "has not finished; stop it, or choose another directory")
