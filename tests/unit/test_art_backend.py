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
    has_signal,
    load_groups,
    model_dir,
    pack_checkpoint,
    parse_options,
    prepare_start,
    read_groups,
    steps,
    unpack_checkpoint,
)
from cuneiform_trainer.main import Trainer
from cuneiform_trainer.settings import TrainerSettings

from tests.unit.test_cpu_backend import dataset


def art_jsonl(groups: list[dict]) -> bytes:
    return b"".join(json.dumps(g).encode() + b"\n" for g in groups)


def test_the_dataset_is_read_into_arts_own_models() -> None:
    groups = dataset(TabularPolicy(), groups=4, size=3)
    same = {"trajectories": [dict(groups[0]["trajectories"][0], reward=1.0)] * 2, "metadata": {"scenario_id": "flat"}}
    single = {"trajectories": [groups[1]["trajectories"][0]], "metadata": {"scenario_id": "alone"}}
    text = art_jsonl([*groups, same, single])
    from art import TrajectoryGroup
    from art.trajectories import History
    from openai.types.chat.chat_completion import Choice

    everything = read_groups(text)
    assert len(everything) == 6 and [has_signal(g) for g in everything] == [True] * 4 + [False, False]
    loaded = load_groups(text)
    # The two groups without GRPO signal (no reward spread; one trajectory) are left out.
    assert len(loaded) == 4 and all(isinstance(g, TrajectoryGroup) for g in loaded)
    assert [len(g.trajectories) for g in loaded] == [3, 3, 3, 3]
    assert [g.metadata["scenario_id"] for g in loaded] == [g["metadata"]["scenario_id"] for g in groups]
    for got, raw in zip(loaded, groups, strict=True):
        assert [t.reward for t in got.trajectories] == [t["reward"] for t in raw["trajectories"]]
    # Every decision of an episode is kept, each in its own history with the trade tool: the model's own
    # turns are ART choices (what ART's tokenizer trains on), the prompts plain messages.
    trajectory, raw = loaded[0].trajectories[0], groups[0]["trajectories"][0]
    assert trajectory.tools == raw["tools"] and trajectory.tools
    assert len(trajectory.additional_histories) == len(raw["additional_histories"]) == 7
    histories = [trajectory.messages_and_choices] + [h.messages_and_choices for h in trajectory.additional_histories]
    assert all(isinstance(h, History) and h.tools == raw["tools"] for h in trajectory.additional_histories)
    for items in histories:
        assert isinstance(items[-1], Choice) and items[-1].message.tool_calls[0].function.name == "trade"
        assert items[0]["role"] == "system" and not any(isinstance(i, Choice) for i in items[:-1])
    # ART 0.5.18's whole-file reader would have kept the first decision only (why it is not used whole).
    from art.utils.trajectory_migration import deserialize_trajectory_groups

    assert deserialize_trajectory_groups(text.decode())[0].trajectories[0].additional_histories == []


def test_a_dataset_without_signal_or_not_art_is_refused() -> None:
    flat = {"trajectories": [dataset(TabularPolicy(), 1, 1)[0]["trajectories"][0] | {"reward": 2.0}] * 3}
    with pytest.raises(ValueError, match="nothing for GRPO to learn from"):
        load_groups(art_jsonl([flat]))
    for bad in [b"\xff\xfe not utf-8", b"{}\n", b"[1]\n", b'{"trajectories": [{"reward": "high"}]}\n', b"not json\n"]:
        with pytest.raises(ValueError, match="not a dataset of ART trajectory groups"):
            load_groups(bad)
    with pytest.raises(ValueError, match="line 2"):
        load_groups(art_jsonl(dataset(TabularPolicy(), 1, 2)) + b'{"trajectories": 3}\n')
    assert read_groups(b"\n\n") == []


def test_hyperparameters() -> None:
    assert parse_options({}) == ArtOptions()
    options = parse_options({"learning_rate": 1e-5, "epochs": 2, "groups_per_step": 3, "kl_penalty_coef": 0.1})
    assert (options.learning_rate, options.epochs, options.groups_per_step) == (1e-5, 2, 3)
    assert [(e, len(b)) for e, b in steps(list(range(7)), options)] == [(1, 3), (1, 3), (1, 1), (2, 3), (2, 3), (2, 1)]
    assert parse_options({"scale_rewards": False, "max_seq_length": 4096.0}).max_seq_length == 4096
    with pytest.raises(ValueError, match=r"takes .*'groups_per_step', 'kl_penalty_coef', 'learning_rate'"):
        parse_options({"beta": 0.1})
    for bad, message in [
        ({"lr": 1}, "unknown hyperparameters"),
        ({"epochs": 1.5}, "epochs must be int"),
        ({"epochs": 0}, "at least 1"),
        ({"learning_rate": -1}, "positive"),
        ({"loss_fn": "dpo"}, "cispo or ppo"),
        ({"allow_training_without_logprobs": "yes"}, "true or false"),
        ({"advantage_balance": 2}, "between -1 and 1"),
        ({"kl_penalty_coef": -0.1}, "not negative"),
        ({"max_seq_length": -1}, "max_seq_length"),
        ({"groups_per_step": True}, "groups_per_step must be int"),
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
    assert not (tmp_path / "out" / HEADER).exists()
    # Sorted plain files, the header first; no times, owners or directory entries; gzip without a name or time.
    assert first[4:8] == b"\x00\x00\x00\x00" and first[3] & 0x08 == 0
    with tarfile.open(fileobj=io.BytesIO(first), mode="r:gz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == [
        HEADER,
        "adapter_config.json",
        "adapter_model.safetensors",
        "sub/tokenizer.json",
    ]
    assert all(m.isfile() and m.mtime == 0 and m.uid == m.gid == 0 and m.mode == 0o644 for m in members)
    # A link in the checkpoint is not followed into the artifact.
    (tmp_path / "a" / "link").symlink_to("/etc/hostname")
    assert pack_checkpoint(tmp_path / "a", header) == first
    assert pack_checkpoint(tmp_path / "a", header | {"step": 4}) != first
    with pytest.raises(ValueError, match="no checkpoint directory"):
        pack_checkpoint(tmp_path / "missing", header)


def hostile(name: str, kind: bytes = tarfile.REGTYPE) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        info = tarfile.TarInfo(HEADER)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
        info = tarfile.TarInfo("fine.bin")  # acceptable, but nothing is written when a later entry is not
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            info.linkname = "/etc/passwd"
        tar.addfile(info, io.BytesIO(b""))
    return buffer.getvalue()


@pytest.mark.parametrize(
    "artifact",
    [
        hostile("../escape"),
        hostile("/etc/cron.d/x"),
        hostile("a/../../b"),
        hostile("link", tarfile.SYMTYPE),
        hostile("hard", tarfile.LNKTYPE),
        hostile("dir", tarfile.DIRTYPE),
        hostile("dev", tarfile.CHRTYPE),
        hostile("fine.bin"),  # twice
    ],
)
def test_an_unsafe_start_artifact_is_refused(tmp_path: Path, artifact: bytes) -> None:
    with pytest.raises(ValueError, match="unsafe entry"):
        unpack_checkpoint(artifact, tmp_path / "out")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "b").exists()
    assert not (tmp_path / "out").exists()


def job(tmp_path: Path, start: bytes | None = None, **hyperparameters: float | int | str | bool) -> TrainingJob:
    return TrainingJob(
        files={"art.jsonl": art_jsonl(dataset(TabularPolicy(), groups=2, size=3))},
        model_name="demo-policy",
        version=f"trained-{uuid.uuid4()}",
        base_model="demo-policy:v3",
        start_artifact=start,
        hyperparameters=hyperparameters,
        workdir=tmp_path,
    )


def test_a_start_artifact_lands_where_art_resumes_from(tmp_path: Path) -> None:
    header = {"base_model": "Qwen/Qwen2.5-0.5B-Instruct", "step": 12}
    artifact = pack_checkpoint(checkpoint(tmp_path / "ckpt"), header)
    root = tmp_path / "art"
    # The LoRA's own base model, not the offer's registry reference.
    assert prepare_start(job(tmp_path, artifact), root) == ("Qwen/Qwen2.5-0.5B-Instruct", 12)
    resumed = root / "cuneiform" / "models" / "demo-policy" / "checkpoints" / "0012"
    assert model_dir(root, "demo-policy") == resumed.parent.parent
    assert sorted(p.relative_to(resumed).as_posix() for p in resumed.rglob("*") if p.is_file()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "sub/tokenizer.json",
    ]
    # ART's own step reader numbers the next checkpoint after it.
    from art.utils.get_model_step import get_step_from_dir

    assert get_step_from_dir(str(model_dir(root, "demo-policy"))) == 12
    # No start artifact: the offer's base model, from scratch.
    assert prepare_start(job(tmp_path), tmp_path / "fresh") == ("demo-policy:v3", 0)
    for bad in [{"step": 1}, {"base_model": "Qwen/Qwen2.5-0.5B-Instruct", "step": -1}]:
        with pytest.raises(ValueError, match=r"names no base_model|no valid step"):
            prepare_start(job(tmp_path, pack_checkpoint(tmp_path / "ckpt", bad)), tmp_path / str(uuid.uuid4()))
    with pytest.raises(ValueError, match=r"not a tar\.gz"):
        prepare_start(job(tmp_path, b'{"logits": {}}'), tmp_path / "cpu-artifact")


def test_load_returns_the_art_backend() -> None:
    backend = load("art", path="/nonexistent/art")
    assert backend.name == "art" and type(backend).__module__ == "cuneiform_trainer.backends.art"


def test_not_an_artifact_of_this_backend(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not a tar\.gz"):
        unpack_checkpoint(b"plain bytes", tmp_path / "out")
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w"):
        pass
    with pytest.raises(ValueError, match=r"no cuneiform-art\.json"):
        unpack_checkpoint(buffer.getvalue(), tmp_path / "out")
    with pytest.raises(ValueError, match="not a JSON object"):
        unpack_checkpoint(hostile_header(b"[1, 2]"), tmp_path / "out2")


def hostile_header(data: bytes) -> bytes:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        info = tarfile.TarInfo(HEADER)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.skipif(gpu_stack_problem() is None, reason="this host can train with ART")
def test_without_the_gpu_stack_the_backend_says_what_to_install(tmp_path: Path) -> None:
    backend = load("art", path=str(tmp_path / "art-root"))
    assert backend.name == "art"
    with pytest.raises(BackendUnavailableError, match=r"cuneiform-trainer\[art\]") as raised:
        backend.train(job(tmp_path), lambda step, metrics: None)
    assert "CUNEIFORM_TRAINER_BACKEND=cpu" in str(raised.value) and "torch" in str(raised.value)
    assert not (tmp_path / "art-root").exists()
    # A job with hyperparameters the backend does not take is refused for that, on any host.
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        backend.train(job(tmp_path, beta=0.1), lambda step, metrics: None)
    # ... and a trainer configured for it refuses to start, so it never claims a batch it cannot train.
    with pytest.raises(BackendUnavailableError, match="GPU"):
        Trainer(TrainerSettings(backend="art"))
