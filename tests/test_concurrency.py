"""Two verydeep processes at once, and a cache that cannot be tricked.

- The weights cache: two processes loading the same URL (or the same registry name) into an
  empty cache download it once; the second waits, says so, and uses the verified file. The
  server (127.0.0.1) holds the first response after its first chunk until the second process is
  waiting, so every round really overlaps.
- Outputs: a second ``extract`` (or ``evaluate``) on an output in use refuses at once with one
  line naming the other process; the first run's file is whole (its zip CRCs check).
- What the cache holds is verified before use (a grown or truncated file is fetched again), no
  symbolic link in it is followed, and URL downloads are keyed by the whole URL.

``VERYDEEP_CONCURRENCY_ROUNDS`` sets the rounds of each two-process race (default 5).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from helpers import Server, cli_error_line, one_line, photo, random_vgg, run_cli

from verydeep import hub
from verydeep.cli import main
from verydeep.core.store import output_lock
from verydeep.errors import VerydeepError, WeightsError
from verydeep.formats.safetensors import read_metadata, save_safetensors
from verydeep.hub.cache import fetch, fetch_url, url_path
from verydeep.hub.download import download, open_in_cache

ROUNDS = int(os.environ.get("VERYDEEP_CONCURRENCY_ROUNDS", "5"))
WAITING = "waiting for another verydeep process"
BUSY = "is being written by another verydeep process"
#: Seconds a round may take before the test gives up (the machine may be busy).
PATIENCE = 180


def python(code: str, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -c code args`` in the background, stderr to ``log``, one thread."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    with open(log, "w") as err:
        return subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=err, text=True, env=full
        )


def wait_for(what: str, logs: list[Path], procs: list[subprocess.Popen]) -> str:
    """Poll the logs until one holds ``what``; its text. Fails if every process exits first."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        for log in logs:
            text = log.read_text()
            if what in text:
                return text
        if all(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    details = "\n".join(f"{log.name}: {log.read_text()[-1500:]}" for log in logs)
    raise AssertionError(f"no process said {what!r}:\n{details}")


def finish(procs: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    """Each process's stdout, after checking that all exited 0."""
    outs = []
    for p, log in zip(procs, logs):
        out, _ = p.communicate(timeout=PATIENCE)
        assert p.returncode == 0, f"exit {p.returncode}: {log.read_text()[-3000:]}"
        assert "Traceback" not in log.read_text()
        outs.append(out.strip())
    return outs


def leftovers(folder: Path) -> list[str]:
    """Partial downloads, locks and temporary files under ``folder``."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith((".part", ".lock")) or ".tmp-" in p.name)


@pytest.fixture
def weights_file(tmp_path) -> bytes:
    """A narrow VGG-16 safetensors file's bytes (~2.4 MB)."""
    model = random_vgg("D", num_classes=10)
    model.class_names = [f"class{i}" for i in range(10)]
    return save_safetensors(model, tmp_path / "served.safetensors").read_bytes()


# -- the cache: one download, shared -------------------------------------------------------------------
FETCH_URL = (
    "import sys\nfrom verydeep.hub.cache import fetch_url\nfrom verydeep.hub.loader import load_file\n"
    "path = fetch_url(sys.argv[1], progress=False)\nload_file(path)\nprint(path)"
)


def test_two_processes_on_one_url_download_it_once_and_both_load_it(tmp_path, weights_file):
    url_name = "models/vgg16-narrow.safetensors"
    server = Server({url_name: weights_file})
    try:
        for r in range(ROUNDS):
            cache = tmp_path / f"home{r}"
            server.gate.clear()
            server.requests.clear()
            logs = [tmp_path / f"a{r}.log", tmp_path / f"b{r}.log"]
            procs = [
                python(FETCH_URL, f"{server.base}/{url_name}", log=log, env={"VERYDEEP_HOME": str(cache)})
                for log in logs
            ]
            said = wait_for(WAITING, logs, procs)
            assert "downloading " + f"{server.base}/{url_name}" in said
            server.gate.set()
            paths = finish(procs, logs)
            assert len(set(paths)) == 1, paths
            assert server.requests == [f"/{url_name}"], f"round {r}: {server.requests}"  # one download
            entry = Path(paths[0])
            assert entry.read_bytes() == weights_file  # not twice its size
            assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name, entry.name + ".json"]
            record = json.loads(Path(str(entry) + ".json").read_text())
            assert record["sha256"] == hashlib.sha256(weights_file).hexdigest()
            assert leftovers(cache) == []
    finally:
        server.close()


#: A process that loads "vgg16" with the registry entry pointed at the stand-in's size and md5.
LOAD_VGG16 = (
    "import dataclasses, sys\nfrom verydeep.hub import registry\n"
    "registry.REGISTRY['vgg16'] = dataclasses.replace(registry.REGISTRY['vgg16'], size=int(sys.argv[1]), "
    "md5=sys.argv[2])\nfrom verydeep.hub.loader import load\nfrom verydeep.hub.cache import cached_path\n"
    "load('vgg16', progress=False)\nprint(cached_path('vgg16'))"
)


def test_two_registry_downloads_at_once_both_succeed(tmp_path, published):
    _, _, server = published
    entry = hub.REGISTRY["vgg16"]  # pointed at the stand-in in this process; the children are told too
    for r in range(ROUNDS):
        cache = tmp_path / f"home{r}"
        server.gate.clear()
        server.requests.clear()
        logs = [tmp_path / f"a{r}.log", tmp_path / f"b{r}.log"]
        env = {"VERYDEEP_HOME": str(cache), "VERYDEEP_MIRROR": server.base}
        procs = [python(LOAD_VGG16, str(entry.size), entry.md5, log=log, env=env) for log in logs]
        assert "downloading vgg16" in wait_for(WAITING, logs, procs)
        server.gate.set()
        paths = finish(procs, logs)
        assert len(set(paths)) == 1 and Path(paths[0]).is_file()
        assert len(server.requests) == 1, f"round {r}: {server.requests}"
        assert sorted(p.name for p in cache.rglob("*") if p.is_file()) == ["vgg16.safetensors"]


# -- outputs: one run at a time ----------------------------------------------------------------------------
@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        photo(200 + 8 * i, 260, seed=i).save(folder / f"img{i}.jpg")
    return folder


#: ``verydeep extract`` that signals once it holds its output (touches argv[1]), then waits for
#: argv[2] to exist before computing: a run caught in the middle, for as long as the test likes.
GATED_EXTRACT = (
    "import sys, time, pathlib\nimport verydeep.extract.job as job\nreal = job._run_chunks\n"
    "def gated(*a, **k):\n    pathlib.Path(sys.argv[1]).touch()\n"
    "    while not pathlib.Path(sys.argv[2]).exists():\n        time.sleep(0.05)\n    return real(*a, **k)\n"
    "job._run_chunks = gated\nfrom verydeep.cli import main\nsys.exit(main(sys.argv[3:]))"
)


def extract_args(images: Path, out: Path, weights: str) -> list[str]:
    return ["extract", str(images), "--layer", "fc7", "-o", str(out), "--weights", weights, "--workers", "0",
            "--batch-size", "2", "--chunk-size", "2", "--no-progress"]  # fmt: skip


def assert_whole_npz(path: Path, rows: int) -> None:
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every member's CRC
    with np.load(path) as z:
        assert z["fc7"].shape[0] == rows and len(z["path"]) == rows


def test_a_second_extract_on_a_busy_output_refuses_at_once(tmp_path, images, narrow_weights):
    out = tmp_path / "feats.npz"
    started, go = tmp_path / "started", tmp_path / "go"
    first = python(
        GATED_EXTRACT, str(started), str(go), *extract_args(images, out, narrow_weights), log=tmp_path / "a.log"
    )
    try:
        deadline = time.monotonic() + PATIENCE
        while not started.exists():
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "a.log").read_text()
            time.sleep(0.05)
        t0 = time.monotonic()
        second = run_cli(extract_args(images, out, narrow_weights), check=False, timeout=PATIENCE)
        assert second.returncode == 1
        assert cli_error_line(second.stderr) == (
            f"verydeep extract: error: {out} {BUSY} (pid {first.pid}); wait for it or choose another output"
        )
        assert time.monotonic() - t0 < 60  # refused, not queued behind the first run
    finally:
        go.touch()
    finish([first], [tmp_path / "a.log"])
    assert_whole_npz(out, 6)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("feats")) == [
        "feats.npz",
        "feats.npz.run.json",
    ]


def test_two_extracts_started_together_leave_one_whole_output(tmp_path, images, narrow_weights):
    """Neither run waits for the other: whichever comes second refuses (busy, or the finished
    output exists); the file left is whole every time."""
    outcomes = []
    for r in range(ROUNDS):
        out = tmp_path / f"race{r}.npz"
        logs = [tmp_path / f"race{r}a.log", tmp_path / f"race{r}b.log"]
        code = "import sys\nfrom verydeep.cli import main\nsys.exit(main(sys.argv[1:]))"
        procs = [python(code, *extract_args(images, out, narrow_weights), log=log) for log in logs]
        codes = [p.wait(PATIENCE) for p in procs]
        assert sorted(codes) == [0, 1], [log.read_text() for log in logs]
        refusal = logs[codes.index(1)].read_text().strip().splitlines()
        assert len(refusal) == 1 and (BUSY in refusal[0] or "exists; pass --resume" in refusal[0]), refusal
        outcomes.append("busy" if BUSY in refusal[0] else "exists")
        assert_whole_npz(out, 6)
        assert not out.with_name(out.name + ".parts").exists() and not out.with_name(out.name + ".lock").exists()
    print(f"{ROUNDS} rounds: {outcomes}")


def test_evaluate_refuses_a_scores_file_another_process_writes(tmp_path, narrow_weights, val_folder, capsys):
    scores = tmp_path / "dense.npz"
    cmd = ["evaluate", str(val_folder), "--weights", narrow_weights, "--protocol", "center", "--scales", "224",
           "--device", "cpu", "--scores", str(scores), "--no-progress", "--workers", "0"]  # fmt: skip
    with output_lock(scores):  # another run holds it (here: this process, through another descriptor)
        assert main(cmd) == 1
    err = capsys.readouterr().err
    assert (
        err == f"verydeep evaluate: error: {scores} {BUSY} (pid {os.getpid()}); wait for it or choose another output\n"
    )
    assert not scores.exists() and not scores.with_name("dense.npz.parts").exists()
    assert main(cmd) == 0  # released: the run goes ahead
    assert not scores.with_name("dense.npz.lock").exists()


# -- what the cache holds is checked before use ----------------------------------------------------------
@pytest.fixture
def server(weights_file, tmp_path):
    other = save_safetensors(random_vgg("A", num_classes=4, seed=3), tmp_path / "other.safetensors").read_bytes()
    s = Server({"x/model.safetensors": weights_file, "y/model.safetensors": other})
    yield s
    s.close()


def test_urls_are_keyed_by_the_whole_url_not_the_file_name(server, weights_file):
    x = fetch_url(f"{server.base}/x/model.safetensors", progress=False)
    y = fetch_url(f"{server.base}/y/model.safetensors", progress=False)
    assert x != y and x.name.endswith("-model.safetensors") and y.name.endswith("-model.safetensors")
    assert x.read_bytes() == weights_file and y.read_bytes() == server.files["y/model.safetensors"]
    assert fetch_url(f"{server.base}/x/model.safetensors", progress=False) == x and len(server.requests) == 2
    assert url_path("http://h/a/b.pth?download=1").name.endswith("-b.pth")  # the suffix picks the reader


def test_a_grown_or_truncated_cache_entry_is_fetched_again(server, weights_file, capsys):
    url = f"{server.base}/x/model.safetensors"
    entry = fetch_url(url, progress=False)
    for damage in (weights_file * 2, weights_file[:-7]):  # two appending writers; a short copy
        entry.write_bytes(damage)
        assert fetch_url(url, progress=False) == entry
        assert entry.read_bytes() == weights_file
        note = capsys.readouterr().err.strip()
        assert note.startswith(f"{entry}: ") and note.endswith("removed it, fetching it again") and "\n" not in note
    assert len(server.requests) == 3


def test_a_grown_registry_file_is_converted_again(published, capsys):
    _, _, server = published
    target = fetch("vgg16", progress=False)
    good = target.read_bytes()
    target.write_bytes(good + good)
    assert fetch("vgg16", progress=False) == target
    assert target.stat().st_size == len(good) and read_metadata(target)["config"] == "D"
    assert "removed it, fetching it again" in capsys.readouterr().err
    assert len(server.requests) == 2


# -- no symbolic link in the cache is followed ---------------------------------------------------------------
def test_a_symlinked_part_file_is_removed_not_written_through(server, weights_file, tmp_path, capsys):
    url = f"{server.base}/x/model.safetensors"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    part = url_path(url).with_name(url_path(url).name + ".part")
    part.parent.mkdir(parents=True)
    part.symlink_to(victim)
    entry = fetch_url(url, progress=False)
    assert victim.read_text() == "precious" and entry.read_bytes() == weights_file
    assert not entry.is_symlink() and not part.exists()
    err = capsys.readouterr().err
    assert f"{part}: a symbolic link in the cache" in err and "removed it" in err


def test_a_symlinked_cache_entry_is_replaced_by_a_verified_file(server, weights_file, tmp_path, capsys):
    url = f"{server.base}/x/model.safetensors"
    impostor = tmp_path / "impostor.safetensors"
    impostor.write_bytes(server.files["y/model.safetensors"])
    entry = url_path(url)
    entry.parent.mkdir(parents=True)
    entry.symlink_to(impostor)
    Path(str(entry) + ".json").write_text(json.dumps({"url": url, "size": impostor.stat().st_size, "sha256": "0"}))
    assert fetch_url(url, progress=False) == entry
    assert not entry.is_symlink() and entry.read_bytes() == weights_file
    assert impostor.read_bytes() == server.files["y/model.safetensors"]  # the link's target is untouched
    assert "a symbolic link in the cache" in capsys.readouterr().err


def test_a_symlinked_registry_file_is_replaced(tmp_path, published, capsys):
    elsewhere = save_safetensors(random_vgg("D", num_classes=1000, width=1 / 16, seed=9), tmp_path / "x.safetensors")
    target = hub.cached_path("vgg16")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.symlink_to(elsewhere)
    part = hub.download_path("vgg16").with_name(hub.download_path("vgg16").name + ".part")
    part.parent.mkdir(parents=True)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"keep me")
    part.symlink_to(victim)
    assert fetch("vgg16", progress=False) == target
    assert not target.is_symlink() and victim.read_bytes() == b"keep me"
    err = capsys.readouterr().err
    assert err.count("a symbolic link in the cache") == 2


def test_cache_files_open_without_following_links(tmp_path):
    (tmp_path / "real").write_bytes(b"x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(WeightsError, match=r"link: a symbolic link in the cache; verydeep does not follow links"):
        open_in_cache(tmp_path / "link")


def test_a_download_that_ends_early_is_not_taken_for_the_file(tmp_path, weights_file):
    """Size unknown (a URL): what the server announced is the size to reach."""
    server = Server({"w": weights_file})
    server.cut_after = 1000  # the whole file's Content-Length, its first 1000 bytes, and the connection closes
    try:
        dest = tmp_path / "w.safetensors"
        with pytest.raises(WeightsError, match=f"expected {len(weights_file)} bytes, found 1000; run the same command"):
            download(f"{server.base}/w", dest, progress=False)
        assert not dest.exists()
    finally:
        server.close()


# -- what a resumed run reads back (the fuzz targets' findings, each at its minimal input) -------------------
def test_a_manifest_that_is_not_utf8_is_one_line(tmp_path):
    from verydeep.core.store import ChunkStore

    store = ChunkStore(tmp_path / "out.parts")
    store.folder.mkdir()
    store.manifest_path.write_bytes(b'{"version": 1, "layers\xe0": 3}')
    with pytest.raises(VerydeepError, match=r"manifest\.json: unreadable \('utf-8' codec can't decode"):
        store.begin({"version": 1}, resume=True)


def _chunk_bytes(**arrays: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def test_a_chunk_zip_of_an_unknown_version_is_one_line(tmp_path):
    from verydeep.core.store import ChunkStore

    store = ChunkStore(tmp_path / "p")
    store.begin({"a": 1}, resume=False)
    data = bytearray(_chunk_bytes(x=np.arange(3)))
    central = data.index(b"PK\x01\x02")
    data[central + 6 : central + 8] = (173).to_bytes(2, "little")  # "needs zip 17.3": NotImplementedError
    store.path_of(0).write_bytes(bytes(data))
    with pytest.raises(
        VerydeepError, match=r"chunk-0000000\.npz: unreadable part of an earlier run \(zip file version 17\.3\)"
    ):
        store.read(0)


def _npz_claiming(member: str, shape: tuple[int, ...], holds: int) -> bytes:
    """An uncompressed .npz whose one .npy member's header declares ``shape`` float32 but which
    holds only ``holds`` bytes of data."""
    import io
    import zipfile

    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(npy, {"descr": "<f4", "fortran_order": False, "shape": shape})
    npy.write(bytes(holds))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr(member, npy.getvalue())
    return buf.getvalue()


def test_a_chunk_whose_header_claims_more_than_it_holds_is_refused_before_numpy_allocates(tmp_path):
    """A few hundred bytes claiming a 40 GB array: refused from the header, one line."""
    from verydeep.core.store import ChunkStore

    store = ChunkStore(tmp_path / "p")
    store.begin({"a": 1}, resume=False)
    store.path_of(0).write_bytes(_npz_claiming("x.npy", (100_000, 100_000), 100))
    with pytest.raises(VerydeepError) as e:
        store.read(0)
    one_line(e, "chunk-0000000.npz", "(100000, 100000) float32", "40,000,000,000 bytes", "the member holds 100")


def test_a_chunk_that_does_not_cover_its_images_is_refused(tmp_path):
    from verydeep.extract.job import merge, parts_store

    out = tmp_path / "f.npz"
    store = parts_store(out)
    manifest = {"version": 1, "chunk": 2}
    store.begin(manifest, resume=False)
    store.write(0, {"fc7": np.zeros((2, 4), np.float32), "__index__": np.array([0, 0]), "__failed__": np.asarray("[]")})
    with pytest.raises(
        VerydeepError,
        match=r"chunk-0000000\.npz: not a part of this run \(its rows and failures are not images 0\.\.1\)",
    ):
        merge(out, store, ["a.jpg", "b.jpg"], ["fc7"], {"fc7": (4,)}, n_chunks=1, manifest=manifest)
    store.write(0, {"fc7": np.zeros((2, 5), np.float32), "__index__": np.array([0, 1]), "__failed__": np.asarray("[]")})
    with pytest.raises(VerydeepError, match=r"not a part of this run \(layer fc7 has float32 rows of \(2, 5\)"):
        merge(out, store, ["a.jpg", "b.jpg"], ["fc7"], {"fc7": (4,)}, n_chunks=1, manifest=manifest)
    assert not out.exists()


def test_a_features_file_with_a_member_that_is_not_an_array_is_one_line(tmp_path):
    from verydeep.extract.writers import read_features

    path = tmp_path / "f.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("path", b"\x00" * 8)  # not .npy: np.load hands back its bytes
    with pytest.raises(VerydeepError, match=r"f\.npz: not a features file verydeep wrote"):
        read_features(path)


def test_a_deflate_bomb_of_features_is_refused_before_it_is_read(tmp_path):
    import io

    from verydeep.extract.writers import read_features

    path = tmp_path / "bomb.npz"
    array = io.BytesIO()
    np.save(array, np.zeros((5000, 1000), np.float32))  # 20 MB of zeros, ~20 KB deflated
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("fc7.npy", array.getvalue())
        z.writestr("path.npy", array.getvalue()[:0])
    with pytest.raises(
        VerydeepError,
        match=r"bomb\.npz: not a features file verydeep wrote \(ValueError: member fc7\.npy claims 20,000,128 bytes",
    ):
        read_features(path)


#: Takes OUT's lock, forks a child that lingers (a DataLoader worker after a kill), prints the
#: child's pid and dies by SIGKILL while holding the lock.
KILLED_HOLDER = (
    "import os, signal, sys, time\nfrom verydeep.core.store import output_lock\n"
    "with output_lock(sys.argv[1]):\n    child = os.fork()\n    if child == 0:\n        time.sleep(120)\n"
    "        os._exit(0)\n    print(child, flush=True)\n    os.kill(os.getpid(), signal.SIGKILL)"
)


def test_a_lock_dies_with_its_process_not_with_a_forked_child(tmp_path):
    out = tmp_path / "f.npz"
    log = tmp_path / "holder.out"
    with open(log, "w") as f:  # a file, not a pipe: the lingering child keeps its copy open
        r = subprocess.run([sys.executable, "-c", KILLED_HOLDER, str(out)], stdout=f, stderr=f, timeout=120)
    assert r.returncode == -9, log.read_text()
    child = int(log.read_text().split()[0])
    try:
        os.kill(child, 0)  # the child still runs, with its copy of the descriptor closed at fork
        with output_lock(out):  # free: no "being written by another verydeep process"
            pass
    finally:
        os.kill(child, 9)
