"""Data-parallel training: 2 processes under torchrun (CPU, gloo) give the weights of one process, one set of files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_training import make_subject, tiny_cfg

from wmloc_utils import checkpoints, training
from wmloc_utils.networks import SegLoss, label_skeleton

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    """test_training's tiny cohort (4 subjects) as pipeline records."""
    folder = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(0)
    table = pd.DataFrame([make_subject(folder, f"s{i}", rng, orientation="LAS" if i % 2 else "RAS") for i in range(4)])
    return training.make_records(table, "t1+flair", "lesion")


def _weights(path):
    return checkpoints.read_checkpoint(path)["model"]


def test_two_processes_train_the_weights_of_one(records, tmp_path):
    # 2 steps of 4 patches (2 volumes x 2): each process trains on 2. 3 training subjects make the second
    # step's batch a short one (the loader's last volume, 2 patches): 1 per process.
    cfg = tiny_cfg(batch_size=4, iters_per_epoch=2)
    cmd = training.launch_files(cfg, records[:3], records[3:], tmp_path / "launch", tmp_path / "ddp", nproc=2)
    assert cmd.startswith("torchrun --standalone --nproc_per_node=2 -m wmloc_utils.training --config ")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = cmd.split()[1:]  # torchrun, as the module of this Python
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", *args, "--quiet"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("best: ") == 1  # rank 0 alone reports

    one = training.train(cfg, records[:3], records[3:], tmp_path / "one", progress=False)
    other_seed = training.train(
        tiny_cfg(batch_size=4, iters_per_epoch=2, seed=1), records[:3], records[3:], tmp_path / "seed1", progress=False
    )

    # one set of files, written by rank 0, loading like any checkpoint, with the single-process config
    assert sorted(p.name for p in (tmp_path / "ddp").iterdir()) == ["best.pt", "history.csv", "last.pt"]
    model, config = checkpoints.load_checkpoint(tmp_path / "ddp" / "best.pt", device="cpu")
    assert training._comparable(config) == training._comparable(checkpoints.read_checkpoint(one["best"])["config"])
    # and so a rerun in one process reuses the 2-process run instead of training again
    stamp = (tmp_path / "ddp" / "last.pt").stat().st_mtime_ns
    training.train(cfg, records[:3], records[3:], tmp_path / "ddp", progress=False)
    assert (tmp_path / "ddp" / "last.pt").stat().st_mtime_ns == stamp

    # Not bit-identical: each process sums its half of the loss's voxel sums and DDP averages two gradients,
    # where one process sums in another order, so float32 rounding differs. A bias just before instance
    # normalisation has a gradient of exactly zero in exact arithmetic: its computed gradient is rounding
    # noise (~1e-10), which Adam divides by its own size, so its steps are up to +-lr whatever the run.
    # Those parameters are told apart by the optimizer's second moments and may only differ by Adam's
    # step bound; every other parameter must agree within rounding.
    state = checkpoints.read_checkpoint(one["last"], needs=("optimizer",))["optimizer"]["state"]
    rms = {k: state[i]["exp_avg_sq"].sqrt().max().item() for i, k in enumerate(_weights(one["last"]))}
    noise = {k for k, v in rms.items() if v < 1e-6 * max(rms.values())}
    assert noise and all(k.endswith("conv.bias") for k in noise) and len(noise) < len(rms) // 2, noise
    a, b, c = _weights(one["last"]), _weights(tmp_path / "ddp" / "last.pt"), _weights(other_seed["last"])
    scale = max(v.abs().max().item() for v in a.values())
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    diff = max(d for k, d in diffs.items() if k not in noise)
    seed_diff = max((a[k] - c[k]).abs().max().item() for k in a if k not in noise)
    print(
        f"max |w_1 - w_2| = {diff:.3g} (weights up to {scale:.3g}; noise-gradient biases "
        f"{max(diffs[k] for k in noise):.3g}); another seed: {seed_diff:.3g}"
    )
    assert diff < 1e-4 * scale
    assert max(diffs[k] for k in noise) <= 2 * cfg.iters_per_epoch * cfg.lr
    # the same patches (every process draws the global batch with the epoch's seed and takes its slice) and
    # the same loss (sums over the whole global batch): other patches, as with another seed, move weights far more
    assert seed_diff > 100 * diff
    hist = [pd.read_csv(d / "history.csv") for d in (tmp_path / "one", tmp_path / "ddp")]
    np.testing.assert_allclose(hist[0]["loss"], hist[1]["loss"], rtol=1e-5)
    np.testing.assert_allclose(hist[0]["val_dice"], hist[1]["val_dice"], atol=1e-4)


def test_global_loss_terms_equal_the_batch_terms():
    """Summing two halves' statistics (what the processes' all-reduce does) gives the whole batch's terms."""
    torch.manual_seed(0)
    logits = torch.randn(4, 2, 12, 12, 12)
    target = torch.randint(0, 3, (4, 1, 12, 12, 12))
    skel = torch.as_tensor(label_skeleton(target[0, 0].numpy(), 2, 2))[None, None].repeat(4, 1, 1, 1, 1)
    loss = SegLoss(ignore_label=2)
    whole = loss.terms(logits, target, skel)
    halves = [(logits[i : i + 2], target[i : i + 2], skel[i : i + 2]) for i in (0, 2)]
    sums = []
    alone = loss.global_terms(*halves[1], reduce=lambda t: sums.append(t) or t)  # the other process's sums
    split = loss.global_terms(*halves[0], reduce=lambda t: t + sums[0])  # ours, with the other's added
    for key in whole:
        assert split[key].item() == pytest.approx(whole[key].item(), abs=1e-6), key
        assert alone[key].item() != pytest.approx(whole[key].item(), abs=1e-4), key  # a half alone is not the batch


def test_rank_share_splits_a_batch_and_stands_in_for_an_empty_share():
    batch = {"image": torch.arange(3)[:, None], "subject": ["a", "a", "b"], "meta": "kept"}
    shares = [training.rank_share(batch, training.Ranks(rank=r, local_rank=r, world_size=2)) for r in (0, 1)]
    assert [s["subject"] for s, _ in shares] == [["a", "a"], ["b"]] and [w for _, w in shares] == [1.0, 1.0]
    assert torch.cat([s["image"] for s, _ in shares]).flatten().tolist() == [0, 1, 2]
    four = [training.rank_share(batch, training.Ranks(rank=r, local_rank=r, world_size=4)) for r in range(4)]
    assert [len(s["image"]) for s, _ in four] == [1, 1, 1, 1] and [w for _, w in four].count(0.0) == 1
    assert training.rank_share(batch, training.Ranks()) == (batch, 1.0)


def test_device_under_torchrun_is_the_local_gpu_or_the_cpu(monkeypatch):
    two = training.Ranks(rank=1, local_rank=1, world_size=2)
    assert training.rank_device("cpu", two) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert training.rank_device("auto", two) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert training.Ranks.from_env() == two and not two.main and two.distributed


def test_config_file_round_trip(tmp_path, records):
    cfg = tiny_cfg(model_overrides={"channels": (4, 8, 16, 32)}, augment="basic")
    training.launch_files(cfg, records[:1], [], tmp_path)
    assert training.model_config(training.read_config(tmp_path / "config.json")) == training.model_config(cfg)
    assert training._read_records(tmp_path / "train.json") == records[:1]
    ckpt_config = {"training": training.model_config(cfg)["training"], "task": "lesion"}
    (tmp_path / "ckpt.json").write_text(json.dumps(ckpt_config))
    assert training.model_config(training.read_config(tmp_path / "ckpt.json")) == training.model_config(cfg)
    (tmp_path / "bad.json").write_text('{"lr": 1, "nope": 2}')
    with pytest.raises(training.InputError, match="bad.json: not a training configuration"):
        training.read_config(tmp_path / "bad.json")
