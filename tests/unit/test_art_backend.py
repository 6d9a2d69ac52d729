"""The ``art`` backend's parts that need no GPU, with the real OpenPipe ART package: the dataset read by
ART's own reader, hyperparameters, checkpoint artifacts (deterministic, and refused when unsafe), and a
clear refusal on a host without ART's GPU stack."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest
from cuneiform_demo.policy import TabularPolicy
from cuneiform_trainer.backends import BackendUnavailableError, TrainingJob, load
from cuneiform_trainer.backends.art import (
    HEADER,
    ArtOptions,
    gpu_stack_problem,
    load_groups,
    pack_checkpoint,
    parse_options,
    steps,
    unpack_checkpoint,
)
from cuneiform_trainer.main import Trainer
from cuneiform_trainer.settings import TrainerSettings

from tests.unit.test_cpu_backend import dataset


def art_jsonl(groups: list[dict]) -> bytes:
    return b"".join(json.dumps(g).encode() + b"\n" for g in groups)


def test_the_dataset_is_read_with_arts_own_reader() -> None:
    groups = dataset(TabularPolicy(), groups=4, size=3)
    same = {"trajectories": [dict(groups[0]["trajectories"][0], reward=1.0)] * 2, "metadata": {"scenario_id": "flat"}}
    single = {"trajectories": [groups[1]["trajectories"][0]], "metadata": {"scenario_id": "alone"}}
    loaded = load_groups(art_jsonl([*groups, same, single]))
    from art import TrajectoryGroup
    from openai.types.chat.chat_completion import Choice

    # The two groups without GRPO signal (no reward spread; one trajectory) are left out.
    assert len(loaded) == 4 and all(isinstance(g, TrajectoryGroup) for g in loaded)
    assert [len(g.trajectories) for g in loaded] == [3, 3, 3, 3]
    assert [t.reward for t in loaded[0].trajectories] == [t["reward"] for t in groups[0]["trajectories"]]
    # The model's own turns are ART choices (what ART trains on), the prompts plain messages.
    first = loaded[0].trajectories[0].messages_and_choices
    assert isinstance(first[-1], Choice) and first[0]["role"] == "system"


def test_a_dataset_without_signal_or_not_art_is_refused() -> None:
    flat = {"trajectories": [dataset(TabularPolicy(), 1, 1)[0]["trajectories"][0] | {"reward": 2.0}] * 3}
    with pytest.raises(ValueError, match="nothing for GRPO to learn from"):
        load_groups(art_jsonl([flat]))
    with pytest.raises(ValueError, match="not a dataset of ART trajectory groups"):
        load_groups(b"\xff\xfe not utf-8")


def test_hyperparameters() -> None:
    assert parse_options({}) == ArtOptions()
    options = parse_options({"learning_rate": 1e-5, "epochs": 2, "groups_per_step": 3, "kl_penalty_coef": 0.1})
    assert (options.learning_rate, options.epochs, options.groups_per_step) == (1e-5, 2, 3)
    assert [(e, len(b)) for e, b in steps(list(range(7)), options)] == [(1, 3), (1, 3), (1, 1), (2, 3), (2, 3), (2, 1)]
    for bad, message in [
        ({"lr": 1}, "unknown hyperparameters"),
        ({"epochs": 1.5}, "epochs must be int"),
        ({"epochs": 0}, "at least 1"),
        ({"learning_rate": -1}, "positive"),
        ({"loss_fn": "dpo"}, "cispo or ppo"),
        ({"allow_training_without_logprobs": "yes"}, "true or false"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_options(bad)


def checkpoint(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00weights" * 100)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "sub" / "tokenizer.json").write_text("{}")
    return folder


def test_checkpoint_artifacts_are_deterministic_and_round_trip(tmp_path: Path) -> None:
    header = {"base_model": "Qwen/Qwen2.5-0.5B-Instruct", "step": 3}
    first = pack_checkpoint(checkpoint(tmp_path / "a"), header)
    # The same files elsewhere, written later: the same bytes.
    assert pack_checkpoint(checkpoint(tmp_path / "b"), header) == first
    assert unpack_checkpoint(first, tmp_path / "out") == header
    assert (tmp_path / "out" / "adapter_model.safetensors").read_bytes() == b"\x00weights" * 100
    assert (tmp_path / "out" / "sub" / "tokenizer.json").read_text() == "{}"


def hostile(name: str, kind: bytes = tarfile.REGTYPE) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        info = tarfile.TarInfo(HEADER)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
        tar.addfile(info, io.BytesIO(b""))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "artifact",
    [hostile("../escape"), hostile("/etc/cron.d/x"), hostile("a/../../b"), hostile("link", tarfile.SYMTYPE)],
)
def test_an_unsafe_start_artifact_is_refused(tmp_path: Path, artifact: bytes) -> None:
    with pytest.raises(ValueError, match="unsafe entry"):
        unpack_checkpoint(artifact, tmp_path / "out")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "b").exists()


def test_not_an_artifact_of_this_backend(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not a tar\.gz"):
        unpack_checkpoint(b"plain bytes", tmp_path / "out")
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w"):
        pass
    with pytest.raises(ValueError, match=r"no cuneiform-art\.json"):
        unpack_checkpoint(buffer.getvalue(), tmp_path / "out")


@pytest.mark.skipif(gpu_stack_problem() is None, reason="this host can train with ART")
def test_without_the_gpu_stack_the_backend_says_what_to_install(tmp_path: Path) -> None:
    backend = load("art")
    assert backend.name == "art"
    job = TrainingJob(
        files={"art.jsonl": art_jsonl(dataset(TabularPolicy(), groups=2, size=3))},
        model_name="demo-policy",
        version=f"trained-{uuid.uuid4()}",
        base_model="Qwen/Qwen2.5-0.5B-Instruct",
        workdir=tmp_path,
    )
    with pytest.raises(BackendUnavailableError, match=r"cuneiform-trainer\[art\]") as raised:
        backend.train(job, lambda step, metrics: None)
    assert "CUNEIFORM_TRAINER_BACKEND=cpu" in str(raised.value)
    # ... and a trainer configured for it refuses to start, so it never claims a batch it cannot train.
    with pytest.raises(BackendUnavailableError, match="GPU"):
        Trainer(TrainerSettings(backend="art"))
