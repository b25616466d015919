"""The decoded store: parallel decoding equal byte for byte to a serial one, interrupted builds completed,
damaged stores rebuilt, bad files handled as before, and a store reused without decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from medxfer.config import TrainConfig
from medxfer.data import decoding
from medxfer.data.cache import DecodeCache
from medxfer.data.loading import load_images
from medxfer.data.prepare import prepare_data
from medxfer.data.readers import ReadOptions, read_image
from medxfer.data.sources import load_manifest
from medxfer.data.transforms import resize_to_uint8
from medxfer.errors import BadFileError

SIZE = 16


def folder(root, n=12, *, rgb=0, eight_bit=0, bad=()):
    """n files per split and class: 16-bit grey PNGs, ``eight_bit`` of them 8-bit, ``rgb`` RGB, ``bad`` (file
    numbers) not images at all."""
    rng = np.random.default_rng(0)
    k = 0
    for split in ("train", "val", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                path = root / split / c / f"{i:03d}.png"
                if k in bad:
                    path.write_bytes(b"not a png")
                elif k < rgb:
                    Image.fromarray(rng.integers(0, 255, (30, 26, 3), dtype=np.uint8)).save(path)
                elif k < rgb + eight_bit:
                    Image.fromarray(rng.integers(0, 255, (30, 26), dtype=np.uint8)).save(path)
                else:
                    Image.fromarray(rng.integers(0, 65535, (30, 26), dtype=np.uint16)).save(path)
                k += 1
    return load_manifest(str(root))


def serial_reference(manifest) -> torch.Tensor:
    """What one process reading one file at a time makes (16-bit grey files only)."""
    read = ReadOptions()
    return torch.cat([resize_to_uint8(read_image(p, read, size=SIZE)[None], SIZE) for p in manifest.table["path"]])


def stores(cache_dir):
    return sorted(p.name for p in (cache_dir / "stores").glob("*") if not p.name.endswith(".lock"))


def test_parallel_decode_equals_serial_decode_byte_for_byte(tmp_path):
    m = folder(tmp_path / "d")
    one = load_images(m, SIZE, cache=DecodeCache(tmp_path / "c1"), workers=1)
    two = load_images(m, SIZE, cache=DecodeCache(tmp_path / "c2"), workers=2)
    none = load_images(m, SIZE, workers=2)    # no cache folder: a temporary store
    ref = serial_reference(m)
    for got in (one, two, none):
        assert got.images.dtype == torch.uint8 and got.images.shape == (72, 1, SIZE, SIZE)
        assert torch.equal(got.images, ref) and got.keep.all() and got.dtypes == {"uint16": 72}
    assert not two.images.numpy().flags.owndata    # a view of the store on disk, not a copy in memory


@pytest.mark.parametrize("workers", [1, 2])
def test_rgb_and_mixed_types_give_what_a_serial_decode_gives(tmp_path, workers):
    """An RGB file in a store started grey makes it 3-channel; 8-bit files among 16-bit ones are scaled per image."""
    m = folder(tmp_path / "d", rgb=1, eight_bit=5)
    got = load_images(m, SIZE, cache=DecodeCache(tmp_path / f"c{workers}"), workers=workers)
    assert got.images.shape[1] == 3 and got.dtypes == {"uint8": 6, "uint16": 66} and len(got.notes) == 2
    per_image = ReadOptions(input_dtype="uint16")
    for i, path in enumerate(m.table["path"]):
        read = per_image if i < 6 else ReadOptions()
        x = resize_to_uint8(read_image(path, read, size=SIZE)[None], SIZE)[0]
        assert torch.equal(got.images[i], x.expand(3, -1, -1)), i
    again = load_images(m, SIZE, cache=DecodeCache(tmp_path / f"c{workers}"), workers=workers)
    assert torch.equal(again.images, got.images) and again.notes == got.notes and again.dtypes == got.dtypes


def count_reads(monkeypatch):
    calls = []
    real = decoding.read_file

    def counted(path, *a, **k):
        calls.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(decoding, "read_file", counted)
    return calls


def test_the_store_is_reused_without_decoding(tmp_path, monkeypatch):
    m = folder(tmp_path / "d")
    first = load_images(m, SIZE, cache=DecodeCache(tmp_path / "c"), workers=2)

    def no(*a, **k):
        raise AssertionError("decoded again")

    monkeypatch.setattr(decoding, "read_file", no)     # forked workers inherit it too
    again = load_images(m, SIZE, cache=DecodeCache(tmp_path / "c"), workers=2)
    assert torch.equal(again.images, first.images) and again.cache_hits == 72
    assert len([s for s in stores(tmp_path / "c") if s.endswith(".npy")]) == 1


def test_a_second_prepare_does_not_decode(tmp_path, monkeypatch):
    data = tmp_path / "d"
    folder(data)
    opts = TrainConfig.create(data=str(data), cache_dir=str(tmp_path / "c"), workers=2).data
    first = prepare_data(opts, SIZE, 0)
    calls = count_reads(monkeypatch)
    opts1 = TrainConfig.create(data=str(data), cache_dir=str(tmp_path / "c"), workers=1).data
    again = prepare_data(opts1, SIZE, 0)
    assert calls == [] and torch.equal(first.images, again.images)


class Interrupted(Exception):
    pass


def test_an_interrupted_decode_leaves_no_store_and_the_next_run_completes_it(tmp_path, monkeypatch):
    m = folder(tmp_path / "d")
    cache = DecodeCache(tmp_path / "c")
    real, seen = decoding.read_file, []

    def dies(path, *a, **k):
        if len(seen) == 30:
            raise Interrupted
        seen.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(decoding, "read_file", dies)
    with pytest.raises(Interrupted):
        load_images(m, SIZE, cache=cache, workers=1)
    left = stores(tmp_path / "c")
    assert not [s for s in left if s.endswith(".npy") and ".partial" not in s]      # nothing under a final name
    assert [s for s in left if s.endswith(".partial.npy")]
    monkeypatch.setattr(decoding, "read_file", real)
    calls = count_reads(monkeypatch)
    done = load_images(m, SIZE, cache=cache, workers=1)
    assert 0 < len(calls) <= 72 - 16       # the rows logged before the interruption are not decoded again
    assert torch.equal(done.images, serial_reference(m))
    assert not [s for s in stores(tmp_path / "c") if ".partial" in s]


def test_a_killed_decode_is_completed_by_the_next_run(tmp_path):
    """A decode killed (SIGKILL) half way, with 2 workers: the next run completes it, equal to a serial decode."""
    m = folder(tmp_path / "d")
    script = textwrap.dedent(f"""
        import os, signal
        from medxfer.data import decoding
        from medxfer.data.cache import DecodeCache
        from medxfer.data.loading import load_images
        from medxfer.data.sources import load_manifest
        real, store = decoding.Store.log, []
        def log(self, rank, record):
            real(self, rank, record)
            store.append(record)
            if len(store) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        decoding.Store.log = log
        load_images(load_manifest({str(tmp_path / "d")!r}), {SIZE}, cache=DecodeCache({str(tmp_path / "c")!r}),
                    workers=2)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr
    assert not [s for s in stores(tmp_path / "c") if s.endswith(".npy") and ".partial" not in s]
    done = load_images(m, SIZE, cache=DecodeCache(tmp_path / "c"), workers=2)
    assert torch.equal(done.images, serial_reference(m))


@pytest.mark.parametrize("damage", ["truncate", "index"])
def test_a_damaged_store_is_rebuilt(tmp_path, monkeypatch, damage):
    m = folder(tmp_path / "d")
    cache = DecodeCache(tmp_path / "c")
    first = load_images(m, SIZE, cache=cache, workers=1)
    ref = first.images.clone()
    del first
    npy = next((tmp_path / "c" / "stores").glob("*[0-9a-f].npy"))
    if damage == "truncate":
        with open(npy, "r+b") as f:
            f.truncate(npy.stat().st_size // 2)
    else:
        npy.with_suffix(".json").write_text('{"format": 1, "compl')
    calls = count_reads(monkeypatch)
    again = load_images(m, SIZE, cache=cache, workers=1)
    assert len(calls) == 72 and torch.equal(again.images, ref)
    index = json.loads(npy.with_suffix(".json").read_text())
    assert index["complete"] is True and index["shape"] == [72, 1, SIZE, SIZE]


def test_a_bad_file_is_skipped_or_refused_as_before_with_two_workers(tmp_path):
    m = folder(tmp_path / "d", bad=(5, 40))
    ids = m.table["sample_id"].astype(str).tolist()
    for cache in (None, DecodeCache(tmp_path / "c")):
        got = load_images(m, SIZE, cache=cache, on_bad_file="skip", workers=2)
        assert [s.sample_id for s in got.skipped] == [ids[5], ids[40]]
        assert not got.keep[5] and not got.keep[40] and got.keep.sum() == 70 and len(got.images) == 70
        ok = m.subset(got.keep)
        assert torch.equal(got.images, serial_reference(ok))
        with pytest.raises(BadFileError) as e:
            load_images(m, SIZE, cache=cache, on_bad_file="error", workers=2)
        assert e.value.sample == ids[5] and str(tmp_path) not in str(e.value)


def test_a_bad_file_first_stops_a_serial_decode_there(tmp_path, monkeypatch):
    m = folder(tmp_path / "d", bad=(3,))
    calls = count_reads(monkeypatch)
    with pytest.raises(BadFileError) as e:
        load_images(m, SIZE, cache=DecodeCache(tmp_path / "c"), on_bad_file="error", workers=1)
    assert e.value.sample == m.table["sample_id"].iloc[3] and len(calls) < 72


def _rank(rank: int, world: int, data: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    real = decoding.read_file

    def counted(path, *a, **k):
        with open(f"{out}/decoded.r{rank}", "a") as f:
            f.write(f"{path}\n")
        return real(path, *a, **k)

    decoding.read_file = counted
    got = load_images(load_manifest(data), SIZE, cache=DecodeCache(cache), workers=1)
    np.save(f"{out}/images.r{rank}.npy", got.images.numpy())
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_ranks_decode_their_share_once_into_one_store(tmp_path):
    import multiprocessing

    m = folder(tmp_path / "d")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank, args=(r, 2, str(tmp_path / "d"), str(tmp_path / "c"), str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    shares = [(tmp_path / f"decoded.r{r}").read_text().split() for r in range(2)]
    assert len(shares[0]) == len(shares[1]) == 36 and sorted(shares[0] + shares[1]) == sorted(m.table["path"])
    ref = serial_reference(m).numpy()
    for r in range(2):
        assert np.array_equal(np.load(tmp_path / f"images.r{r}.npy"), ref)
    assert len([s for s in stores(tmp_path / "c") if s.endswith(".npy")]) == 1


def test_an_edited_file_is_decoded_again_even_with_its_old_size_and_time(tmp_path, monkeypatch):
    """Unchanged files are found by stat (no hashing); a file rewritten with the same size and mtime is not."""
    m = folder(tmp_path / "d")
    cache = DecodeCache(tmp_path / "c")
    first = load_images(m, SIZE, cache=cache, workers=1).images.clone()
    hashed = []
    real = decoding._hash
    monkeypatch.setattr(decoding, "_hash", lambda paths, pool: hashed.append(1) or real(paths, pool))
    assert torch.equal(load_images(m, SIZE, cache=cache, workers=1).images, first) and hashed == []
    path = m.table["path"].iloc[7]
    st = os.stat(path)
    x = np.asarray(Image.open(path))
    Image.fromarray((65535 - x).astype(np.uint16)).save(path)          # other pixels...
    with open(path, "r+b") as f:                                        # ...at the old size and time
        f.truncate(st.st_size)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = load_images(m, SIZE, cache=cache, on_bad_file="skip", workers=1)
    assert hashed == [1] and not torch.equal(again.images, first)
