"""``verydeep train`` across two hosts: ``torchrun --nnodes 2`` between two network namespaces.

Each "host" is a network namespace of its own (its own interfaces, addresses and loopback),
joined to the other by a veth pair: the only way the two torchrun agents and their workers can
reach each other is that link, as between two machines. The c10d rendezvous listens on host 0's
address and gloo's all-reduce runs over the veth (``GLOO_SOCKET_IFNAME``). The two hosts share
the filesystem (the data and the run folder), as hosts on a shared filesystem do.

Needs root and iproute2 (``ip netns``); skips with the reason where namespaces cannot be made.
The namespaces carry this process's id and a random tag, so parallel runs cannot collide, and
are deleted (with anything still running inside them) whatever the test's outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import make_image_folder, read_jsonl
from safetensors.torch import load_file

from verydeep.cli import main
from verydeep.core.numerics import relative_error
from verydeep.train import KILL_AT_ENV, Trainer, prepare_config

pytestmark = pytest.mark.slow

PY = sys.executable
WIDTH = 1 / 32  # conv1 has 2 channels; 126,648 parameters for 4 classes
PORT = 29500  # the rendezvous port on host 0 (each namespace has its own port space)
LAUNCH_TIMEOUT_S = 150  # a two-host launch takes 10-20 s here; a hung collective fails the test instead
# 24 images, batch 8: 3 steps per epoch, 2 epochs. Checkpoints at steps 2, 3 (epoch end), 4, 6.
# Dropout off: its masks are drawn per rank, so only then is one process the same computation.
# Glorot init: a calm trajectory, so float32 rounding in another order stays at rounding level
# (on a run that amplifies differences, 6 steps turn rounding into a large share of the change).
COMMON = [
    "--arch", "A", "--width", str(WIDTH), "--init", "glorot", "--dropout", "0", "--seed", "7",
    "--scale", "224", "240", "--batch-size", "8", "--epochs", "2", "--lr", "1e-3",
    "--checkpoint-every", "2", "--deterministic",
    "--workers", "0", "--device", "cpu", "--no-progress", "--no-tensorboard", "--json",
]  # fmt: skip
STEPS = 6


@dataclass(frozen=True)
class Host:
    """One namespace: its name, the veth end inside it and that end's address."""

    netns: str
    ifname: str
    addr: str


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _ip_ok(*args: str) -> str:
    r = _ip(*args)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def _kill_everything_in(netns: str) -> None:
    """SIGKILL the processes inside one of this test's namespaces (all started by this test)."""
    for pid in _ip("netns", "pids", netns).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def hosts() -> Iterator[tuple[Host, Host]]:
    """Two namespaces joined by a veth pair, 10.87.0.1/24 and 10.87.0.2/24 (inside them only)."""
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2 (the `ip` command) to make two hosts out of network namespaces")
    tag = f"verydeep-mh-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    pair = (Host(f"{tag}-0", "vd0", "10.87.0.1"), Host(f"{tag}-1", "vd1", "10.87.0.2"))
    made: list[str] = []
    try:
        for h in pair:
            r = _ip("netns", "add", h.netns)
            if r.returncode != 0:
                if not made:
                    why = r.stderr.strip()
                    pytest.skip(f"cannot create network namespaces (`ip netns add`: {why}); needs root (CAP_SYS_ADMIN)")
                raise RuntimeError(f"ip netns add {h.netns}: {r.stderr.strip()}")
            made.append(h.netns)
        # The pair is made inside host 0 with its peer placed in host 1: it never exists outside them.
        a, b = pair
        r = _ip("-n", a.netns, "link", "add", a.ifname, "type", "veth", "peer", "name", b.ifname, "netns", b.netns)
        if r.returncode != 0:
            pytest.skip(f"cannot create a veth pair between network namespaces: {r.stderr.strip()}")
        for h in pair:
            _ip_ok("-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.ifname)
            _ip_ok("-n", h.netns, "link", "set", "lo", "up")
            _ip_ok("-n", h.netns, "link", "set", h.ifname, "up")
        yield pair
    finally:
        for name in made:
            _kill_everything_in(name)
        for name in made:  # deleting host 0 removes the veth pair with it
            _ip("netns", "del", name)


def _sent_bytes(host: Host) -> int:
    """Bytes sent by ``host`` over its veth end (the kernel's counter)."""
    (link,) = json.loads(_ip_ok("-n", host.netns, "-j", "-s", "link", "show", host.ifname))
    return int(link["stats64"]["tx"]["bytes"])


@dataclass(frozen=True)
class Launch:
    returncodes: tuple[int, int]
    logs: tuple[str, str]

    def tails(self) -> str:
        noise = "hostname of the client socket cannot be retrieved"  # no reverse DNS for 10.87.0.x
        return "\n".join(
            f"--- host {i} (exit {rc}):\n" + "\n".join(line for line in log.splitlines() if noise not in line)[-3000:]
            for i, (rc, log) in enumerate(zip(self.returncodes, self.logs, strict=True))
        )


def torchrun_command(host: Host, master: Host, *, run_id: str, is_host: bool) -> list[str]:
    """The torchrun line one host runs: 2 nodes x 1 process, c10d rendezvous on ``master``."""
    return [
        PY, "-m", "torch.distributed.run",
        "--nnodes", "2", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{master.addr}:{PORT}", "--rdzv-id", run_id,
        # The shared hostname resolves to neither namespace, so say which host serves the
        # rendezvous and which address each host is reached at.
        "--rdzv-conf", f"is_host={int(is_host)},join_timeout=60", "--local-addr", host.addr,
        "--max-restarts", "0",
        "-m", "verydeep",
    ]  # fmt: skip


def launch(
    pair: tuple[Host, Host],
    train_args: list[str],
    logs: Path,
    *,
    run_id: str,
    kill_host1_at: int | None = None,
) -> Launch:
    """Both hosts' torchrun at once; waits for both (bounded), killing everything on a timeout."""
    procs, files = [], []
    for i, h in enumerate(pair):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "VERYDEEP_HOME": str(logs / "home")}
        env["GLOO_SOCKET_IFNAME"] = h.ifname  # gloo's all-reduce over the veth, not the hostname's address
        env.pop(KILL_AT_ENV, None)
        if i == 1 and kill_host1_at is not None:
            env[KILL_AT_ENV] = str(kill_host1_at)  # host 1's worker SIGKILLs itself after that step
        log = open(logs / f"{run_id}-host{i}.log", "w")  # a file, not a pipe: nothing can block on it
        files.append(log)
        cmd = ["ip", "netns", "exec", h.netns, *torchrun_command(h, pair[0], run_id=run_id, is_host=i == 0)]
        procs.append(subprocess.Popen([*cmd, *train_args], env=env, stdout=log, stderr=subprocess.STDOUT))
    deadline, timed_out = time.monotonic() + LAUNCH_TIMEOUT_S, False
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        for h in pair:
            _kill_everything_in(h.netns)
        for p in procs:
            p.wait(timeout=30)
    finally:
        for f in files:
            f.close()
    first, second = ((logs / f"{run_id}-host{i}.log").read_text() for i in range(2))
    result = Launch((procs[0].returncode, procs[1].returncode), (first, second))
    if timed_out:
        raise AssertionError(f"two-host launch {run_id} ran past {LAUNCH_TIMEOUT_S} s\n{result.tails()}")
    return result


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def initial_weights(train: Path, out: Path) -> dict[str, torch.Tensor]:
    """The parameters every run here starts from (Glorot, seed 7), without training."""
    overrides = {"data": str(train), "out": str(out), "arch": "A", "width": WIDTH, "init": "glorot", "seed": 7}
    overrides["batch_size"] = 8
    cfg = prepare_config(None, {**overrides, "device": "cpu", "tensorboard": False, "progress": False})
    job = Trainer(cfg, log=lambda msg: None)
    state = {k: v.detach().clone() for k, v in job.model.state_dict().items()}
    job.close()
    return state


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """24 training images (6 per class, 4 classes) and 8 validation images."""
    root = tmp_path_factory.mktemp("multihost-data")
    return make_image_folder(root / "train", 6, seed=10), make_image_folder(root / "val", 2, seed=11)


def train_args(data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    train, val = data
    return ["train", "--data", str(train), "--val", str(val), "--out", str(out), *COMMON, *extra]


@pytest.fixture(scope="module")
def two_hosts(hosts, data, tmp_path_factory) -> dict:
    """The uninterrupted two-host run, with the bytes each host sent over the veth meanwhile."""
    root = tmp_path_factory.mktemp("multihost")
    before = [_sent_bytes(h) for h in hosts]
    t0 = time.perf_counter()
    run = launch(hosts, train_args(data, root / "two"), root, run_id="whole")
    seconds = time.perf_counter() - t0
    assert run.returncodes == (0, 0), run.tails()
    sent = [_sent_bytes(h) - b for h, b in zip(hosts, before, strict=True)]
    print(f"two-host run: {seconds:.1f} s; bytes sent over the veth by host 0, host 1: {sent}")
    return {"out": root / "two", "root": root, "run": run, "sent": sent}


def test_two_hosts_match_one_process(two_hosts, data, tmp_path):
    run = two_hosts["run"]
    out = two_hosts["out"]
    assert sum(log.count(f'"steps": {STEPS}') for log in run.logs) == 1  # rank 0 alone reports
    assert "batch 8 = 2 rank(s) x 1 x 4" in run.logs[0]  # host 0 holds rank 0 (ranks follow the addresses)
    # Every step all-reduces every gradient, so each host must send the other at least one
    # float32 per parameter per step: the job really talked over the veth.
    n_params = sum(t.numel() for t in weights(out / "model.safetensors").values())
    assert min(two_hosts["sent"]) >= STEPS * n_params * 4, two_hosts["sent"]

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers run with one thread each
    try:
        assert main(train_args(data, tmp_path / "one")) == 0
    finally:
        torch.set_num_threads(before)
    one, two = weights(tmp_path / "one" / "model.safetensors"), weights(out / "model.safetensors")
    start = initial_weights(data[0], tmp_path / "init")
    assert one.keys() == two.keys() == start.keys()
    # Tolerance, per tensor: max |two - one| <= 1e-4 of max |one - start| (how far the 6 steps
    # moved it). Measured at most 9.2e-6 (relative_error at most 4.3e-6) on the Ice Lake-SP CPU
    # here: float32 sums in another order (each rank sums its 4 images, gloo adds the halves).
    # A wrong split (a mean over 4 images instead of 8, one rank's gradient alone) changes the
    # step by tens of percent.
    fractions, rel = {}, {}
    for k in one:
        moved = (one[k] - start[k]).abs().max().item()
        assert moved > 0, f"{k} did not train"
        fractions[k] = (two[k] - one[k]).abs().max().item() / moved
        rel[k] = relative_error(two[k], one[k])
    worst = max(fractions, key=fractions.__getitem__)
    print(
        f"two hosts vs one process: max |diff| / |training change| {fractions[worst]:.3g} ({worst}); "
        f"max relative_error {max(rel.values()):.3g} ({max(rel, key=rel.__getitem__)})"
    )
    assert fractions[worst] <= 1e-4, f"{worst}: {fractions[worst]:.3g} of its change in training"
    # Validation: each of the 8 images counted once over the two hosts, the same loss.
    va = [r for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if r["kind"] == "val"]
    vb = [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "val"]
    assert [r["images"] for r in vb] == [r["images"] for r in va] == [8, 8]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(va, vb, strict=True)) < 1e-4


@pytest.fixture(scope="module")
def resumed(hosts, two_hosts, data) -> dict:
    """The same run with host 1's worker SIGKILLed right after step 5 (epoch 2, step 2 of 3),
    then the same command with --resume on both hosts."""
    root = two_hosts["root"]
    out = root / "killed"
    killed = launch(hosts, train_args(data, out), root, run_id="killed", kill_host1_at=5)
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step-*.pt"))
    weights_after_kill = (out / "model.safetensors").exists()
    t0 = time.perf_counter()
    again = launch(hosts, train_args(data, out, "--resume"), root, run_id="resumed")
    print(f"resumed two-host run: {time.perf_counter() - t0:.1f} s")
    return {
        "out": out,
        "killed": killed,
        "checkpoints": checkpoints,
        "weights_after_kill": weights_after_kill,
        "again": again,
    }


def same_except_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "images_per_s")} for r in rows]


def test_killed_host_then_resume_gives_the_same_weights(resumed, two_hosts):
    killed, again = resumed["killed"], resumed["again"]
    # Host 0's worker loses its peer in the next all-reduce: both torchruns fail, no weights.
    assert killed.returncodes[0] != 0 and killed.returncodes[1] != 0, killed.tails()
    assert "SIGKILL" in killed.logs[1], killed.tails()  # torchrun's report of host 1's worker
    assert not resumed["weights_after_kill"]
    assert resumed["checkpoints"][-1] == "step-000000004.pt"
    # --resume restarts inside epoch 2 from step 4 and redoes step 5.
    assert again.returncodes == (0, 0), again.tails()
    assert "epoch 2, 1 of 3 steps done" in again.logs[0]
    a, b = weights(two_hosts["out"] / "model.safetensors"), weights(resumed["out"] / "model.safetensors")
    assert a.keys() == b.keys()
    # Tolerance 0: same ranks, same split, every random number restored or re-derived, and a
    # sum of two addends is the same in either order. Measured: bit-identical.
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    print(f"resumed vs uninterrupted (two hosts): max |diff| {max(diffs.values()):.3g}")
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {diffs[k]:.3g}"


def test_resumed_metrics_equal_the_uninterrupted_ones(resumed, two_hosts):
    rows = read_jsonl(resumed["out"] / "metrics.jsonl")
    assert len({(r["kind"], r["step"]) for r in rows}) == len(rows)  # each step once
    assert same_except_timing(rows) == same_except_timing(read_jsonl(two_hosts["out"] / "metrics.jsonl"))
