"""The resumable chunk store on its own: resuming, refusing another run, stale and interrupted writes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from verydeep.core.distributed import Context
from verydeep.core.store import ChunkStore, model_fingerprint
from verydeep.errors import VerydeepError

MANIFEST = {"inputs": 10, "layers": ["fc7"], "pool": "max", "chunk": 4}


def chunk_arrays(k: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(k)
    return {"rows": rng.standard_normal((4, 3)).astype(np.float32), "index": np.arange(4 * k, 4 * k + 4)}


def test_a_resumed_store_holds_the_chunks_written_before(tmp_path):
    first = ChunkStore(tmp_path / "out.parts")
    assert not first.exists()
    assert first.begin(MANIFEST, resume=False) == MANIFEST
    for k in (0, 2):
        first.write(k, chunk_arrays(k))
    again = ChunkStore(tmp_path / "out.parts")  # another process, after a kill
    assert again.exists()
    assert again.begin(MANIFEST, resume=True) == MANIFEST
    assert again.done() == {0, 2}
    assert again.missing(4) == [1, 3]
    for k in (0, 2):
        back = again.read(k)
        assert back.keys() == {"rows", "index"}
        for name, array in chunk_arrays(k).items():
            np.testing.assert_array_equal(back[name], array)
    assert again.read(2, ["index"]).keys() == {"index"}
    again.remove()
    assert not (tmp_path / "out.parts").exists()


def test_a_different_run_is_refused_naming_the_folder_key_and_both_values(tmp_path):
    folder = tmp_path / "out.parts"
    ChunkStore(folder).begin(MANIFEST, resume=False)
    with pytest.raises(VerydeepError) as e:
        ChunkStore(folder).begin({**MANIFEST, "pool": "avg"}, resume=True)
    message = str(e.value)
    assert "\n" not in message
    assert str(folder) in message and "cannot resume: pool" in message
    assert '"max"' in message and '"avg"' in message
    with pytest.raises(VerydeepError, match="cannot resume: extra"):  # a key the earlier run did not have
        ChunkStore(folder).begin({**MANIFEST, "extra": 1}, resume=True)


def test_partial_results_need_resume_or_overwrite(tmp_path):
    folder = tmp_path / "out.parts"
    store = ChunkStore(folder, start_over="pass --overwrite to start over")
    store.begin(MANIFEST, resume=False)
    store.write(0, chunk_arrays(0))
    with pytest.raises(VerydeepError, match="pass --resume to continue it, or pass --overwrite to start over"):
        store.begin(MANIFEST, resume=False)
    with pytest.raises(VerydeepError, match=f"delete {folder} to start over"):
        ChunkStore(folder).begin({**MANIFEST, "pool": "avg"}, resume=True)
    fresh = ChunkStore(folder)
    other = {**MANIFEST, "pool": "avg"}
    assert fresh.begin(other, resume=False, overwrite=True) == other  # the earlier run's chunks are gone
    assert fresh.done() == set()


def test_adopted_keys_keep_the_earlier_value(tmp_path):
    ChunkStore(tmp_path / "p").begin(MANIFEST, resume=False)
    found = ChunkStore(tmp_path / "p").begin({**MANIFEST, "chunk": 64}, resume=True, adopt=("chunk",))
    assert found["chunk"] == 4


def test_tuples_compare_as_they_read_back(tmp_path):
    ChunkStore(tmp_path / "p").begin({"scales": (256, 384)}, resume=False)
    assert ChunkStore(tmp_path / "p").begin({"scales": (256, 384)}, resume=True) == {"scales": [256, 384]}


def test_temporary_files_of_killed_writes_are_ignored_then_cleared(tmp_path):
    folder = tmp_path / "out.parts"
    store = ChunkStore(folder)
    store.begin(MANIFEST, resume=False)
    store.write(0, chunk_arrays(0))
    stale = folder / ".chunk-0000001.npz.tmp-4242-0123abcd.npz"  # what a kill during a write leaves
    stale.write_bytes(b"PK\x03\x04 half a zip")
    assert store.done() == {0}
    ChunkStore(folder).begin(MANIFEST, resume=True)
    assert not stale.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["chunk-0000000.npz", "manifest.json"]


def test_a_chunk_is_whole_or_absent(tmp_path, monkeypatch):
    folder = tmp_path / "out.parts"
    store = ChunkStore(folder)
    store.begin(MANIFEST, resume=False)
    store.write(0, chunk_arrays(0))
    real_savez = np.savez

    def dying_savez(file, *args, **kwargs):
        file.write(b"PK\x03\x04 the first bytes")
        raise KeyboardInterrupt  # killed half way through the write

    monkeypatch.setattr(np, "savez", dying_savez)
    with pytest.raises(KeyboardInterrupt):
        store.write(1, chunk_arrays(1))
    with pytest.raises(KeyboardInterrupt):
        store.write(0, chunk_arrays(5))  # rewriting a chunk leaves the one written before whole
    monkeypatch.setattr(np, "savez", real_savez)
    assert store.done() == {0}
    assert sorted(p.name for p in folder.iterdir()) == ["chunk-0000000.npz", "manifest.json"]
    np.testing.assert_array_equal(store.read(0)["rows"], chunk_arrays(0)["rows"])


def test_an_unreadable_chunk_names_its_file(tmp_path):
    store = ChunkStore(tmp_path / "p", prefix="chunks")
    store.begin(MANIFEST, resume=False)
    store.path_of(3).write_bytes(b"not an npz")
    assert store.done() == {3}
    with pytest.raises(VerydeepError, match=r"chunks-0000003\.npz: unreadable part"):
        store.read(3)


def test_an_unreadable_manifest_is_an_error(tmp_path):
    store = ChunkStore(tmp_path / "p", manifest="state.json")
    store.begin(MANIFEST, resume=False)
    (tmp_path / "p" / "state.json").write_text("{ half")
    with pytest.raises(VerydeepError, match=r"state\.json: unreadable"):
        ChunkStore(tmp_path / "p", manifest="state.json").begin(MANIFEST, resume=True)


def test_a_rank_started_on_its_own_writes_the_manifest(tmp_path):
    """One shard run by hand (no process group): it prepares what rank 0 would have."""
    store = ChunkStore(tmp_path / "p")
    assert store.begin(MANIFEST, resume=False, ctx=Context(1, 2, 1)) == MANIFEST
    assert store.exists()
    store.synchronize(Context(1, 2, 1))  # nobody to wait for


def small_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2))


def test_model_fingerprint_follows_weights_and_shapes():
    net = small_net(0)
    assert model_fingerprint(net) == model_fingerprint(copy.deepcopy(net))
    assert model_fingerprint(net) != model_fingerprint(small_net(1))
    changed = copy.deepcopy(net)
    with torch.no_grad():
        changed[2].bias[0] += 1.0
    assert model_fingerprint(changed) != model_fingerprint(net)
    wider = nn.Sequential(nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Linear(5, 2))
    assert model_fingerprint(wider) != model_fingerprint(net)
    assert model_fingerprint(copy.deepcopy(net).double()) != model_fingerprint(net)
