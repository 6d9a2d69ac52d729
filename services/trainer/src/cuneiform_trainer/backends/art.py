"""The ``art`` backend: OpenPipe ART (LoRA GRPO with Unsloth and vLLM) on a GPU host.

Install on the GPU host with ``pip install 'cuneiform-trainer[art]'`` (``openpipe-art[backend]==0.5.18``,
the last ART release for Python 3.11) and run ``CUNEIFORM_TRAINER_BACKEND=art cuneiform-trainer``. Nothing
here imports ART's GPU stack before a job arrives, so this module loads anywhere; without the stack the
trainer's preflight (and any job) fails at once saying what to install.

**What it does with a job.**

* ``art.jsonl`` is read into ART's own ``TrajectoryGroup`` / ``Trajectory`` / ``History`` models, each
  recorded response turned into an OpenAI ``Choice`` by ART's own conversion (``dict_to_message_or_choice``)
  — what ART's tokenizer trains on. Not with ``deserialize_trajectory_groups`` as a whole: in 0.5.18 it
  drops every trajectory's ``tools`` and ``additional_histories``, and the demo records one history per
  decision, so it would train on the first decision of each episode only, without the tool schema. Groups
  that cannot teach GRPO anything (fewer than two trajectories, or no reward spread) are left out, and a
  dataset with none is refused.
* The model is ``art.TrainableModel(name=<model>, project="cuneiform", base_model=<base model>)`` on a
  ``LocalBackend`` in a fresh directory of the job's scratch space. ``base_model`` is a Hugging Face model id
  (``Qwen/Qwen2.5-7B-Instruct``). When the offer has a start artifact (the previous version, produced by
  this backend), its LoRA checkpoint is unpacked as ``<path>/cuneiform/models/<model>/checkpoints/<step>``:
  ART resumes from the latest checkpoint there (Unsloth loads it as the model, vLLM serves it), and the
  base model is the one the checkpoint was trained on (the artifact's header says which).
* Each ART train step (``LocalBackend.train``) takes ``groups_per_step`` groups; ``epochs`` passes over the
  dataset. After each step, ``progress(step, metrics)`` reports ART's metrics (``loss/train``, …) plus
  ``step``, ``epoch`` and ``loss``.
* The artifact is the final LoRA checkpoint directory as a deterministic ``tar.gz`` (sorted names, mtime
  0, no owners) with a ``cuneiform-art.json`` header (base model, step, ART version): equal checkpoints
  give equal bytes, and the next training can start from it. Unpacking accepts only plain files with
  relative names inside the target (no ``..``, absolute paths, links or devices).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from . import BackendUnavailableError, Progress, TrainingJob, TrainingOutput, coerce_hyperparameters

PROJECT = "cuneiform"
HEADER = "cuneiform-art.json"
#: The distribution that provides ``art``, and the release this backend is written against.
ART_DISTRIBUTION = "openpipe-art"
ART_VERSION = "0.5.18"
#: What the GPU stack consists of; each must be importable for a job to run.
GPU_MODULES = ("torch", "unsloth", "vllm")
INSTALL_HINT = (
    "install it on a host with an NVIDIA GPU: pip install 'cuneiform-trainer[art]' "
    "(or run this trainer with CUNEIFORM_TRAINER_BACKEND=cpu)"
)


def _offline_litellm() -> None:
    """Call before importing ``art``: it imports litellm, which otherwise fetches its model cost map from
    the network at import."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


# --- hyperparameters ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArtOptions:
    """The offer's hyperparameters as ART understands them (``LocalBackend.train``'s keywords, mostly)."""

    learning_rate: float = 5e-6
    #: Passes over the dataset's groups.
    epochs: int = 1
    #: Groups per ART train step (one ``LocalBackend.train`` call, one checkpoint).
    groups_per_step: int = 8
    #: ART's KL-penalized advantage (toward the base model, LoRA disabled); 0 turns it off.
    kl_penalty_coef: float = 0.0
    loss_fn: str = "cispo"
    #: Divide each group's advantages by its reward std (GRPO's normalisation).
    scale_rewards: bool = True
    #: Weight of negative vs positive advantages, in [-1, 1] (0: balanced).
    advantage_balance: float = 0.0
    #: The demo's recorded decisions carry no token logprobs; real agents should record them.
    allow_training_without_logprobs: bool = True
    #: Unsloth's ``max_seq_length``; 0 keeps ART's default (32768).
    max_seq_length: int = 0


_TYPES: dict[str, type] = {
    "learning_rate": float,
    "epochs": int,
    "groups_per_step": int,
    "kl_penalty_coef": float,
    "loss_fn": str,
    "scale_rewards": bool,
    "advantage_balance": float,
    "allow_training_without_logprobs": bool,
    "max_seq_length": int,
}


def parse_options(hyperparameters: Mapping[str, Any]) -> ArtOptions:
    """The offer's hyperparameters, checked; ``ValueError`` naming what is wrong (or what is accepted)."""
    values = coerce_hyperparameters("art", hyperparameters, _TYPES)
    options = ArtOptions(**values)
    if options.epochs < 1 or options.groups_per_step < 1:
        raise ValueError("epochs and groups_per_step must be at least 1")
    if not (0 < options.learning_rate < math.inf) or not (0 <= options.kl_penalty_coef < math.inf):
        raise ValueError("learning_rate must be positive and finite, kl_penalty_coef finite and not negative")
    if options.loss_fn not in ("cispo", "ppo"):
        raise ValueError("loss_fn is cispo or ppo (what ART's LocalBackend supports)")
    if not (-1 <= options.advantage_balance <= 1):
        raise ValueError("advantage_balance must be between -1 and 1")
    if options.max_seq_length < 0:
        raise ValueError("max_seq_length must not be negative (0: ART's default)")
    return options


def steps(groups: Sequence[Any], options: ArtOptions) -> Iterator[tuple[int, list[Any]]]:
    """(epoch, groups) of each train step, in dataset order (the archiver writes groups sorted by
    scenario, so a job is reproducible); the last step of an epoch may be smaller."""
    for epoch in range(1, options.epochs + 1):
        for begin in range(0, len(groups), options.groups_per_step):
            yield epoch, list(groups[begin : begin + options.groups_per_step])


# --- the dataset --------------------------------------------------------------------------------------


def read_groups(art_jsonl: bytes) -> list[Any]:
    """Every line of ``art.jsonl`` as an ART ``TrajectoryGroup`` (blank lines ignored), with each
    trajectory's tools and additional histories, and every recorded response an OpenAI ``Choice``."""
    _offline_litellm()
    from art import TrajectoryGroup

    try:
        text = art_jsonl.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"art.jsonl is not a dataset of ART trajectory groups: {error}") from None
    groups = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            if not isinstance(raw, dict) or not isinstance(raw.get("trajectories"), list):
                raise ValueError("not an object with a trajectories list")
            trajectories = [_trajectory(t) for t in raw["trajectories"]]
            group = TrajectoryGroup(
                trajectories,
                metadata=raw.get("metadata") or {},
                metrics=raw.get("metrics") or {},
                logs=raw.get("logs") or [],
            )
        except (ValueError, TypeError, KeyError) as error:  # pydantic's ValidationError is a ValueError
            raise ValueError(f"art.jsonl is not a dataset of ART trajectory groups: line {number}: {error}") from None
        groups.append(group)
    return groups


def _trajectory(raw: Any) -> Any:
    from art.trajectories import History, Trajectory

    if not isinstance(raw, dict):
        raise ValueError("a trajectory is not an object")
    trajectory = Trajectory.model_validate(raw)  # ART's model keeps message and choice dicts as given
    trajectory.messages_and_choices = _items(trajectory.messages_and_choices)
    trajectory.additional_histories = [
        History(messages_and_choices=_items(h.messages_and_choices), tools=h.tools)
        for h in trajectory.additional_histories
    ]
    return trajectory


def _items(items: Sequence[Any]) -> list[Any]:
    from art.utils.trajectory_migration import dict_to_message_or_choice

    return [dict_to_message_or_choice(item) if isinstance(item, dict) else item for item in items]


def has_signal(group: Any) -> bool:
    """Whether GRPO can learn from the group: two or more trajectories whose rewards differ."""
    rewards = [float(t.reward) for t in group.trajectories]
    if len(rewards) < 2 or not all(math.isfinite(r) for r in rewards):
        return False
    return max(rewards) - min(rewards) > 1e-9 * max(1.0, max(abs(r) for r in rewards))


def load_groups(art_jsonl: bytes) -> list[Any]:
    """The groups of the dataset that can teach GRPO something (:func:`has_signal`); ``ValueError`` when
    there are none."""
    groups = read_groups(art_jsonl)
    useful = [g for g in groups if has_signal(g)]
    if not useful:
        raise ValueError(
            f"art.jsonl has {len(groups)} groups and none with two or more trajectories and a reward spread: "
            "nothing for GRPO to learn from"
        )
    return useful


# --- checkpoints as artifacts -------------------------------------------------------------------------


def pack_checkpoint(directory: Path, header: Mapping[str, Any]) -> bytes:
    """The checkpoint directory's files (and ``header`` as ``cuneiform-art.json``) as a deterministic
    tar.gz: sorted names, mtime 0, mode 0644, owner 0, no directory entries; links are left out."""
    if not directory.is_dir():
        raise ValueError(f"no checkpoint directory at {directory}")
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(filename="", fileobj=buffer, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        _add(tar, HEADER, json.dumps(dict(header), sort_keys=True).encode())
        files = [p for p in directory.rglob("*") if p.is_file() and not p.is_symlink()]
        for path in sorted(files, key=lambda p: p.relative_to(directory).as_posix()):
            name = path.relative_to(directory).as_posix()
            if name != HEADER:
                _add(tar, name, path.read_bytes())
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def unpack_checkpoint(artifact: bytes, directory: Path) -> dict[str, Any]:
    """Unpack an artifact of this backend into ``directory``; its header. Only plain files with relative
    names that stay inside ``directory`` are accepted (an artifact is input: never trust its paths), and
    nothing is written unless every entry is acceptable."""
    try:
        with tarfile.open(fileobj=io.BytesIO(artifact), mode="r:gz") as tar:
            members = tar.getmembers()
            _check(members, directory)
            header = _extract(tar, members, directory)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"the start artifact is not a tar.gz of an ART checkpoint: {error}") from None
    if header is None:
        raise ValueError(f"the start artifact has no {HEADER}: it was not made by the art backend")
    return header


def _check(members: Sequence[tarfile.TarInfo], directory: Path) -> None:
    root = directory.resolve()
    seen: set[str] = set()
    for member in members:
        name = PurePosixPath(member.name)
        unsafe = not member.isfile() or name.is_absolute() or ".." in name.parts or not name.parts
        if not unsafe:
            target = (root / name).resolve()
            unsafe = root not in target.parents
        if unsafe or str(name) in seen:
            raise ValueError(f"the start artifact has an unsafe entry {member.name!r}: refusing it")
        seen.add(str(name))


def _extract(tar: tarfile.TarFile, members: Sequence[tarfile.TarInfo], directory: Path) -> dict[str, Any] | None:
    header: dict[str, Any] | None = None
    directory.mkdir(parents=True, exist_ok=True)
    for member in members:
        source = tar.extractfile(member)
        data = source.read() if source is not None else b""
        if member.name == HEADER:
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                raise ValueError(f"the start artifact's {HEADER} is not a JSON object")
            header = parsed
            continue
        target = directory / PurePosixPath(member.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return header


def start_base_model(header: Mapping[str, Any]) -> str:
    """The Hugging Face model a start artifact's LoRA belongs on: the one its header names (the offer's
    ``base_model`` may be a registry reference such as ``demo-policy:v3`` when a previous version exists)."""
    base = header.get("base_model")
    if not isinstance(base, str) or not base:
        raise ValueError(f"the start artifact's {HEADER} names no base_model")
    return base


# --- the GPU stack ------------------------------------------------------------------------------------


def gpu_stack_problem() -> str | None:
    """Why this host cannot train with ART, or None when it can: ART itself, torch, Unsloth and vLLM
    importable, and CUDA available to torch."""
    try:
        installed = importlib.metadata.version(ART_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return f"the art backend needs OpenPipe ART ({ART_DISTRIBUTION}=={ART_VERSION}), and it is not installed"
    missing = [m for m in GPU_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        return (
            f"the art backend needs ART's GPU stack, and {', '.join(missing)} {verb} not installed "
            f"({ART_DISTRIBUTION} {installed} is, without its backend extra)"
        )
    try:
        import torch
    except ImportError as error:  # installed but broken (a CUDA library missing, …)
        return f"the art backend needs torch, and importing it failed: {error}"
    if not torch.cuda.is_available():
        return "the art backend needs an NVIDIA GPU, and torch sees none (torch.cuda.is_available() is False)"
    return None


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float]:
    found = {
        str(k): float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }
    if "loss/train" in found:
        found.setdefault("loss", found["loss/train"])
    return found


# --- the backend --------------------------------------------------------------------------------------


def model_dir(root: Path, model_name: str) -> Path:
    """Where ``LocalBackend(path=root)`` keeps the model (``art/utils/output_dirs.py``: ``get_model_dir``)."""
    return root / PROJECT / "models" / model_name


def prepare_start(job: TrainingJob, root: Path) -> tuple[str, int]:
    """Put the job's start artifact where ART resumes from, in ART's directory ``root``; the base model to
    train and the step training continues from (the base model and 0 without a start artifact).

    ART takes the highest ``checkpoints/<step>`` of the model's directory as the model to load
    (``art/dev/get_model_config.py``, ``art/unsloth/service.py``) and numbers the next checkpoint after it
    (``art/utils/get_model_step.py``)."""
    root.mkdir(parents=True, exist_ok=True)
    if not job.start_artifact:
        return job.base_model, 0
    staging = root / "start-checkpoint"
    header = unpack_checkpoint(job.start_artifact, staging)
    step = header.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"the start artifact's {HEADER} has no valid step: {step!r}")
    base_model = start_base_model(header)
    destination = model_dir(root, job.model_name) / "checkpoints" / f"{step:04d}"
    if destination.exists():
        raise ValueError(f"ART's directory {root} already has a checkpoint {step}: refusing to mix models")
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(destination)
    return base_model, step


@dataclass
class _Run:
    step: int
    steps: int
    checkpoint: str | None
    metrics: dict[str, float]


class ArtBackend:
    """The ``art`` backend (see the module docstring)."""

    name = "art"

    def __init__(self, path: str | Path | None = None) -> None:
        #: Where ART's working directories go (one per job, removed afterwards); by default the job's
        #: scratch directory.
        self.path = Path(path) if path is not None else None

    def preflight(self) -> None:
        problem = gpu_stack_problem()
        if problem is not None:
            raise BackendUnavailableError(f"{problem}: {INSTALL_HINT}")

    def train(self, job: TrainingJob, progress: Progress) -> TrainingOutput:
        options = parse_options(job.hyperparameters)
        self.preflight()
        if "art.jsonl" not in job.files:
            raise ValueError(f"the dataset has no art.jsonl (it has {sorted(job.files)})")
        groups = load_groups(job.files["art.jsonl"])
        with self._directory(job) as root:
            base_model, start_step = prepare_start(job, root)
            run = asyncio.run(self._run(job.model_name, base_model, root, start_step, groups, options, progress))
            if run.checkpoint is None:
                raise RuntimeError("ART trained but saved no checkpoint")
            header = {
                "art": importlib.metadata.version(ART_DISTRIBUTION),
                "base_model": base_model,
                "model": job.model_name,
                "step": run.step,
                "version": job.version,
            }
            artifact = pack_checkpoint(Path(run.checkpoint), header)
        metrics = {
            **run.metrics,
            "step": float(run.step),
            "steps": float(run.steps),
            "epochs": float(options.epochs),
            "groups": float(len(groups)),
            "trajectories": float(sum(len(g.trajectories) for g in groups)),
        }
        return TrainingOutput(artifact, metrics, content_type="application/gzip")

    @contextlib.contextmanager
    def _directory(self, job: TrainingJob) -> Iterator[Path]:
        """ART's directory for the job: in its scratch space, or a fresh one under ``path`` (removed after)."""
        if self.path is None:
            yield job.workdir / "art"
            return
        self.path.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix=f"{job.model_name}-", dir=self.path))
        try:
            yield root
        finally:
            shutil.rmtree(root, ignore_errors=True)

    async def _run(
        self,
        model_name: str,
        base_model: str,
        root: Path,
        start_step: int,
        groups: list[Any],
        options: ArtOptions,
        progress: Progress,
    ) -> _Run:  # pragma: no cover - needs a GPU (see the README)
        _offline_litellm()
        try:
            import art
            from art.local import LocalBackend
        except ImportError as error:
            raise BackendUnavailableError(f"ART's LocalBackend cannot be imported ({error}): {INSTALL_HINT}") from None

        internal: dict[str, Any] = {}
        if options.max_seq_length:
            internal["init_args"] = {"max_seq_length": options.max_seq_length}
        model: Any = art.TrainableModel(
            name=model_name,
            project=PROJECT,
            base_model=base_model,
            _internal_config=internal or None,  # type: ignore[arg-type]
        )
        run = _Run(step=start_step, steps=0, checkpoint=None, metrics={})
        async with LocalBackend(path=str(root)) as backend:
            # Starts vLLM on the latest checkpoint (the start artifact's, or a fresh LoRA saved as step 0).
            await model.register(backend)
            for epoch, batch in steps(groups, options):
                result = await backend.train(
                    model,
                    batch,
                    learning_rate=options.learning_rate,
                    loss_fn=options.loss_fn,  # type: ignore[arg-type]
                    kl_penalty_coef=options.kl_penalty_coef,
                    scale_rewards=options.scale_rewards,
                    advantage_balance=options.advantage_balance,
                    allow_training_without_logprobs=options.allow_training_without_logprobs,
                )
                run.step, run.steps = int(result.step), run.steps + 1
                run.checkpoint = result.checkpoint_path or run.checkpoint
                run.metrics = _numbers(result.metrics)
                progress(run.step, {**run.metrics, "step": float(run.step), "epoch": float(epoch)})
        return run


def create(path: str | None = None) -> ArtBackend:
    """The ``art`` backend; ``path``: where ART's working directories go (default: each job's scratch)."""
    return ArtBackend(path)
