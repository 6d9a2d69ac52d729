"""The ``art`` backend: OpenPipe ART (LoRA GRPO with Unsloth and vLLM) on a GPU host.

Install on the GPU host with ``pip install 'cuneiform-trainer[art]'`` (``openpipe-art[backend]==0.5.18``,
the last ART release for Python 3.11) and run ``CUNEIFORM_TRAINER_BACKEND=art cuneiform-trainer``. Nothing
here imports ART's GPU stack before a job arrives, so this module loads anywhere; without the stack a job
fails at once with what to install (and the dispatcher offers the batch to another trainer).

**What it does with a job.**

* ``art.jsonl`` is read with ART's own reader (``deserialize_trajectory_groups``), so the trainer sees
  exactly the ``TrajectoryGroup`` objects the archiver meant; groups that cannot teach GRPO anything (fewer
  than two trajectories, or no reward spread) are left out, and a dataset with none is refused.
* The model is ``art.TrainableModel(name=<model>, project="cuneiform", base_model=<base_model>)`` on a
  ``LocalBackend`` rooted in the job's scratch directory. ``base_model`` is a Hugging Face model id
  (``Qwen/Qwen2.5-7B-Instruct``). When the offer names a start artifact (the previous version, produced by
  this backend), its LoRA checkpoint is unpacked where ART looks for checkpoints, so training continues
  from it instead of from the bare base model.
* Each ART train step takes ``groups_per_step`` groups; ``epochs`` passes over the dataset. After each
  step, ``progress(step, metrics)`` reports ART's metrics (loss, grad norm, …).
* The artifact is the final LoRA checkpoint directory as a deterministic ``tar.gz`` (sorted names, mtime
  0, no owners) with a ``cuneiform-art.json`` header (base model, step, ART version): equal checkpoints
  give equal bytes, and the next training can start from it.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from . import BackendUnavailableError, Progress, TrainingJob, TrainingOutput, coerce_hyperparameters

PROJECT = "cuneiform"
HEADER = "cuneiform-art.json"
#: What the GPU stack consists of; each must be importable for a job to run.
GPU_MODULES = ("torch", "unsloth", "vllm")
INSTALL_HINT = (
    "install it on a host with an NVIDIA GPU: pip install 'cuneiform-trainer[art]' "
    "(or run this trainer with CUNEIFORM_TRAINER_BACKEND=cpu)"
)


@dataclass(frozen=True)
class ArtOptions:
    """The offer's hyperparameters as ART understands them."""

    learning_rate: float = 5e-6
    epochs: int = 1
    groups_per_step: int = 8
    kl_penalty_coef: float = 0.0
    loss_fn: str = "cispo"
    #: The demo's recorded decisions carry no token logprobs; real agents should record them.
    allow_training_without_logprobs: bool = True


_TYPES: dict[str, type] = {
    "learning_rate": float,
    "epochs": int,
    "groups_per_step": int,
    "kl_penalty_coef": float,
    "loss_fn": str,
    "allow_training_without_logprobs": bool,
}


def parse_options(hyperparameters: Mapping[str, Any]) -> ArtOptions:
    values = coerce_hyperparameters("art", hyperparameters, _TYPES)
    options = ArtOptions(**values)
    if options.epochs < 1 or options.groups_per_step < 1:
        raise ValueError("epochs and groups_per_step must be at least 1")
    if not (0 < options.learning_rate < math.inf) or options.kl_penalty_coef < 0:
        raise ValueError("learning_rate must be positive and finite, kl_penalty_coef not negative")
    if options.loss_fn not in ("cispo", "ppo"):
        raise ValueError("loss_fn is cispo or ppo (what ART's LocalBackend supports)")
    return options


# --- the dataset --------------------------------------------------------------------------------------


def load_groups(art_jsonl: bytes) -> list[Any]:
    """ART ``TrajectoryGroup``s of the dataset that can teach GRPO something (see the module docstring)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # ART imports litellm: no network fetch
    from art.utils.trajectory_migration import deserialize_trajectory_groups

    try:
        groups = deserialize_trajectory_groups(art_jsonl.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"art.jsonl is not a dataset of ART trajectory groups: {error}") from None
    useful = [g for g in groups if _has_signal(g)]
    if not useful:
        raise ValueError(
            f"art.jsonl has {len(groups)} groups and none with two or more trajectories and a reward spread: "
            "nothing for GRPO to learn from"
        )
    return useful


def _has_signal(group: Any) -> bool:
    rewards = [float(t.reward) for t in group.trajectories]
    return len(rewards) >= 2 and max(rewards) - min(rewards) > 1e-9 * max(1.0, max(abs(r) for r in rewards))


def steps(groups: Sequence[Any], options: ArtOptions) -> Iterator[tuple[int, list[Any]]]:
    """(epoch, groups) of each train step, in dataset order (the archiver writes groups sorted by
    scenario, so a job is reproducible)."""
    for epoch in range(1, options.epochs + 1):
        for begin in range(0, len(groups), options.groups_per_step):
            yield epoch, list(groups[begin : begin + options.groups_per_step])


# --- checkpoints as artifacts -------------------------------------------------------------------------


def pack_checkpoint(directory: Path, header: Mapping[str, Any]) -> bytes:
    """The checkpoint directory (and ``header``) as a deterministic tar.gz."""
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        _add(tar, HEADER, json.dumps(dict(header), sort_keys=True).encode())
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            if path.is_symlink():
                continue
            _add(tar, path.relative_to(directory).as_posix(), path.read_bytes())
    return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def unpack_checkpoint(artifact: bytes, directory: Path) -> dict[str, Any]:
    """Unpack an artifact of this backend into ``directory``; its header. Only plain files with relative
    names that stay inside ``directory`` are accepted (an artifact is input: never trust its paths)."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(artifact), mode="r:gz") as tar:
            header = _extract(tar, directory)
    except (tarfile.TarError, OSError, EOFError) as error:
        raise ValueError(f"the start artifact is not a tar.gz of an ART checkpoint: {error}") from None
    if header is None:
        raise ValueError(f"the start artifact has no {HEADER}: it was not made by the art backend")
    return header


def _extract(tar: tarfile.TarFile, directory: Path) -> dict[str, Any] | None:
    header: dict[str, Any] | None = None
    root = directory.resolve()
    for member in tar.getmembers():
        name = PurePosixPath(member.name)
        target = (directory / name).resolve()
        if not member.isfile() or name.is_absolute() or ".." in name.parts or root not in target.parents:
            raise ValueError(f"the start artifact has an unsafe entry {member.name!r}: refusing it")
        source = tar.extractfile(member)
        data = source.read() if source is not None else b""
        if member.name == HEADER:
            header = json.loads(data)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return header


# --- the GPU stack ------------------------------------------------------------------------------------


def gpu_stack_problem() -> str | None:
    """Why this host cannot train with ART, or None when it can."""
    missing = [m for m in GPU_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        return f"the art backend needs ART's GPU stack, and {', '.join(missing)} {verb} not installed"
    import torch

    if not torch.cuda.is_available():
        return "the art backend needs an NVIDIA GPU, and torch sees none (torch.cuda.is_available() is False)"
    return None


# --- the backend --------------------------------------------------------------------------------------


class ArtBackend:
    name = "art"

    def __init__(self, path: str | Path | None = None) -> None:
        #: ART's working directory; by default a directory in each job's scratch space.
        self.path = Path(path) if path is not None else None

    def preflight(self) -> None:
        problem = gpu_stack_problem()
        if problem is not None:
            raise BackendUnavailableError(f"{problem}: {INSTALL_HINT}")

    def train(self, job: TrainingJob, progress: Progress) -> TrainingOutput:
        options = parse_options(job.hyperparameters)
        self.preflight()
        groups = load_groups(job.files["art.jsonl"])
        return asyncio.run(self._train(job, groups, options, progress))

    async def _train(
        self, job: TrainingJob, groups: list[Any], options: ArtOptions, progress: Progress
    ) -> TrainingOutput:  # pragma: no cover - needs a GPU (see the README: tested on a GPU host by hand)
        import art
        from art.local import LocalBackend

        root = self.path or job.workdir / "art"
        model: Any = art.TrainableModel(name=job.model_name, project=PROJECT, base_model=job.base_model)
        start_step = 0
        if job.start_artifact:
            # Where LocalBackend looks for the latest checkpoint: training resumes from it.
            header = unpack_checkpoint(job.start_artifact, root / "tmp-start")
            start_step = int(header.get("step", 0))
            destination = root / PROJECT / "models" / job.model_name / "checkpoints" / f"{start_step:04d}"
            destination.parent.mkdir(parents=True, exist_ok=True)
            (root / "tmp-start").rename(destination)
        metrics: dict[str, float] = {}
        checkpoint: str | None = None
        step = start_step
        async with LocalBackend(path=str(root)) as backend:
            await model.register(backend)
            for epoch, batch in steps(groups, options):
                result = await backend.train(
                    model,
                    batch,
                    learning_rate=options.learning_rate,
                    kl_penalty_coef=options.kl_penalty_coef,
                    loss_fn=options.loss_fn,  # type: ignore[arg-type]
                    allow_training_without_logprobs=options.allow_training_without_logprobs,
                )
                step = result.step
                checkpoint = result.checkpoint_path or checkpoint
                metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, int | float)}
                progress(step, {"step": float(step), "epoch": float(epoch), **metrics})
        if checkpoint is None:
            raise RuntimeError("ART trained but saved no checkpoint")
        header = {"base_model": job.base_model, "model": job.model_name, "version": job.version, "step": step,
                  "art": importlib.metadata.version("openpipe-art")}  # fmt: skip
        artifact = pack_checkpoint(Path(checkpoint), header)
        summary = {
            **metrics,
            "steps": float(step - start_step),
            "groups": float(len(groups)),
            "trajectories": float(sum(len(g.trajectories) for g in groups)),
        }
        return TrainingOutput(artifact, summary, content_type="application/gzip")


def create(path: str | None = None) -> ArtBackend:
    return ArtBackend(path)
