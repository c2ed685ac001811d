from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
import urllib.error

import numpy as np
import pytest
import torch

from fastres import data as fdata
from fastres.config import DataCfg
from fastres.data import cifar
from fastres.data.base import DataError, Split, normalize
from fastres.data.draws import PAD, aug_params, epoch_indices, steps_per_epoch
from fastres.data.gpu import crop_flip
from fastres.data.loaders import build_loader
from fastres.errors import UserError

from conftest import write_batch, write_cifar

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------- reader

def test_reads_the_official_layout(small_cifar):
    d = cifar.read_cifar10(small_cifar)
    assert d.train.x.shape == (500, 3, 32, 32) and d.train.x.dtype == np.uint8
    assert d.train.y.shape == (500,) and d.train.y.dtype == np.int64
    assert d.test.x.shape == (100, 3, 32, 32)
    # rows are CHW planes: the first 1024 bytes of a row are the red channel
    raw = pickle.load(open(small_cifar / "data_batch_2", "rb"), encoding="bytes")
    np.testing.assert_array_equal(d.train.x[100, 0].ravel(), raw[b"data"][0, :1024])
    np.testing.assert_array_equal(d.train.y[100:200], raw[b"labels"])


def test_finds_the_folder_from_its_parent(small_cifar):
    assert cifar.find(small_cifar.parent) == small_cifar
    assert cifar.find(small_cifar) == small_cifar
    assert cifar.find(small_cifar / "nothing") is None


@pytest.mark.parametrize("damage, words", [
    ("truncate", ["data_batch_3", "truncated"]),
    ("garbage", ["data_batch_3", "not a CIFAR-10 pickle"]),
    ("wrong_shape", ["data_batch_3", "expected uint8 (100, 3072)"]),
    ("wrong_dtype", ["data_batch_3", "float32"]),
    ("labels_range", ["data_batch_3", "labels out of range"]),
    ("labels_count", ["data_batch_3", "'labels' has shape (99,)"]),
    ("no_data_key", ["data_batch_3", "no 'data'/'labels'"]),
    ("not_a_dict", ["data_batch_3", "not a CIFAR-10 batch"]),
    ("code", ["data_batch_3", "system, which a CIFAR-10 file never does"]),
    ("missing", ["data_batch_3", "missing"]),
    ("too_big", ["data_batch_3", "far more than a CIFAR-10 batch of 100 images"]),
    # LONG_BINPUT 2**31 - 1: the C unpickler would size its memo to 16 GB before anything else
    ("huge_memo_index", ["data_batch_3", "no 'data'/'labels'"]),
])
def test_bad_files_are_one_line_errors_naming_the_file(small_cifar, damage, words):
    path = small_cifar / "data_batch_3"
    good = path.read_bytes()
    x = np.zeros((100, 3072), np.uint8)
    if damage == "truncate":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00not a pickle" * 10)
    elif damage == "wrong_shape":
        write_batch(path, np.zeros((100, 1024), np.uint8), [0] * 100)
    elif damage == "wrong_dtype":
        write_batch(path, x.astype(np.float32), [0] * 100)
    elif damage == "labels_range":
        write_batch(path, x, [10] * 100)
    elif damage == "labels_count":
        write_batch(path, x, [0] * 99)
    elif damage == "no_data_key":
        pickle.dump({b"images": x}, open(path, "wb"))
    elif damage == "not_a_dict":
        pickle.dump([1, 2, 3], open(path, "wb"))
    elif damage == "code":  # a pickle that would run a command when loaded
        class Evil:
            def __reduce__(self):
                import os
                return (os.system, ("echo pwned",))
        pickle.dump({b"data": Evil()}, open(path, "wb"))
    elif damage == "missing":
        path.unlink()
    elif damage == "too_big":
        path.write_bytes(good * 4)
    elif damage == "huge_memo_index":
        path.write_bytes(b"\x80\x02}r\xff\xff\xff\x7f.")
    with pytest.raises(DataError) as e:
        cifar.read_cifar10(small_cifar)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)


def test_any_damaged_bytes_give_a_data_error(small_cifar):
    """Random bytes drive the unpickler into almost any exception (OverflowError on a huge BINBYTES length,
    KeyError on an unknown memo, ...): every one of them must come out as the one-line DataError."""
    path = small_cifar / "data_batch_3"
    good = path.read_bytes()
    rng = np.random.default_rng(0)
    cases = [rng.bytes(int(n)) for n in rng.integers(1, 5000, 300)]
    for _ in range(300):  # one byte of the good file changed in its header (pickle opcodes and lengths)
        b = bytearray(good)
        b[int(rng.integers(0, 200))] = int(rng.integers(0, 256))
        cases.append(bytes(b))
    for data in cases:
        path.write_bytes(data)
        try:
            cifar.read_batch(path, 100)
        except DataError as e:
            assert "\n" not in str(e) and "data_batch_3" in str(e)


def test_real_set_validates(real_cifar):
    d = cifar.read_cifar10(real_cifar)
    assert len(d.train) == 50_000 and len(d.test) == 10_000
    assert np.bincount(d.train.y).tolist() == [5000] * 10
    assert np.bincount(d.test.y).tolist() == [1000] * 10
    # the channel statistics used to normalize are the training set's own (to 3 decimals)
    mean = d.train.x.reshape(50_000, 3, -1).mean(axis=(0, 2)) / 255
    np.testing.assert_allclose(mean, cifar.MEAN, atol=1e-3)


def test_missing_set_offline_says_where_to_put_it(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(cifar.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        cifar.ensure(tmp_path / "empty")
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and str((tmp_path / "empty").resolve()) in msg and "\n" not in msg
    assert not list((tmp_path / "empty").glob("*.part"))  # no partial download left behind


def test_a_failed_download_leaves_no_folder_it_made(tmp_path, monkeypatch):
    """Offline, into folders that do not exist: one line, and the file system as it was (no empty data dir)."""
    def offline(*a, **k):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(cifar.urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as e:
        cifar.ensure(tmp_path / "new" / "nested" / "cifar")
    assert "downloading" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []  # new/, new/nested/ and cifar/ all gone
    (tmp_path / "mine").mkdir()  # a folder the user had stays, even empty
    with pytest.raises(DataError):
        cifar.ensure(tmp_path / "mine" / "cifar")
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []


def _archive(tmp_path) -> bytes:
    src = write_cifar(tmp_path / "src" / "cifar-10-batches-py", per_file=100)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return buf.getvalue()


def test_download_verifies_checksum_and_unpacks(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar, "PER_FILE", 100)
    blob = _archive(tmp_path)
    monkeypatch.setattr(cifar.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(blob))
    with pytest.raises(DataError, match="MD5"):
        cifar.download(tmp_path / "bad", md5="0" * 32)
    assert not (tmp_path / "bad").exists()  # nothing kept of a rejected archive, nor the folder made for it
    folder = cifar.download(tmp_path / "good", md5=hashlib.md5(blob).hexdigest())
    assert folder == tmp_path / "good" / "cifar-10-batches-py"
    assert len(cifar.read_cifar10(tmp_path / "good").train) == 500


def test_download_unpacks_what_torchvisions_download_and_extract_archive_unpacks(tmp_path, monkeypatch):
    """The same archive (served over HTTP on this machine's loopback), the same MD5: the same cifar-10-batches-py,
    file for file and byte for byte. fastres keeps its own: a failure leaves no archive, .part file or folder behind,
    and says so in one line (torchvision keeps the archive it fetched beside the data, and raises its own errors)."""
    import functools
    import http.server
    import threading
    utils = pytest.importorskip("torchvision.datasets.utils", reason="torchvision is not installed beside this torch")
    monkeypatch.setattr(cifar, "PER_FILE", 100)
    blob = _archive(tmp_path)
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "cifar-10-python.tar.gz").write_bytes(blob)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url, md5 = f"http://127.0.0.1:{server.server_port}/cifar-10-python.tar.gz", hashlib.md5(blob).hexdigest()
    try:
        ours = cifar.download(tmp_path / "ours", url=url, md5=md5)
        utils.download_and_extract_archive(url, str(tmp_path / "theirs"), md5=md5)
    finally:
        server.shutdown()
    theirs = tmp_path / "theirs" / "cifar-10-batches-py"
    listing = sorted(p.relative_to(ours) for p in ours.rglob("*"))
    assert listing == sorted(p.relative_to(theirs) for p in theirs.rglob("*")) and len(listing) == 7  # + meta
    assert all((ours / p).read_bytes() == (theirs / p).read_bytes() for p in listing)
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["cifar-10-batches-py"]  # nothing else kept


def test_a_data_root_holds_cifar10_cifar100_and_image_folders_side_by_side(tmp_path, monkeypatch):
    """data.dir names a root: CIFAR-10, CIFAR-100 and an image folder (data.folder) are found in it side by side;
    a path straight to cifar-10-batches-py still works, and CIFAR-100 is then looked for (and downloaded) beside it,
    not inside it; the layout fastres wrote before data roots (data/cifar10/cifar-10-batches-py) is found too."""
    from test_folder import make_folder, write_cifar100
    monkeypatch.setattr(cifar, "PER_FILE", 100)
    monkeypatch.setattr(cifar, "SIZES_100", {"train": 120, "test": 40})
    root = tmp_path / "data"
    write_cifar(root / "cifar-10-batches-py", per_file=100)
    write_cifar100(root / "cifar-100-python")
    make_folder(root / "pets")
    assert fdata.load(DataCfg(source="cifar10", dir=str(root))).num_classes == 10
    assert fdata.load(DataCfg(source="cifar100", dir=str(root))).num_classes == 100
    pets = fdata.load(DataCfg(source="folder", dir=str(root), folder="pets", image_size=32), tmp_path / "run")
    assert pets.num_classes == 4 and len(pets.train) == 24
    straight = root / "cifar-10-batches-py"
    assert len(fdata.load(DataCfg(source="cifar10", dir=str(straight))).train) == 500
    assert fdata.load(DataCfg(source="cifar100", dir=str(straight))).num_classes == 100  # found beside it
    assert cifar.data_root(straight) == root.resolve() and cifar.data_root(root) == root.resolve()
    old = tmp_path / "old"
    write_cifar(old / "cifar10" / "cifar-10-batches-py", per_file=100)
    assert cifar.find(old) == (old / "cifar10" / "cifar-10-batches-py").resolve()


def test_a_failed_download_leaves_the_users_folder_untouched(tmp_path, monkeypatch):
    """The archive goes to a temporary folder: the user's data folder gets no .part file while it downloads, and is as
    it was after a connection that drops or an archive whose MD5 is wrong."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    seen = []

    class Dropping(io.BytesIO):
        def read(self, n=-1):
            seen.append(sorted(p.name for p in mine.iterdir()))
            if len(seen) == 3:
                raise OSError("connection reset")
            return b"x" * 1024
    monkeypatch.setattr(cifar.urllib.request, "urlopen", lambda url, timeout: Dropping())
    with pytest.raises(DataError, match="connection reset"):
        cifar.download(mine)
    assert seen == [["notes.txt"]] * 3 and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    blob = _archive(tmp_path)
    monkeypatch.setattr(cifar.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(blob))
    with pytest.raises(DataError, match="MD5"):
        cifar.download(mine, md5="0" * 32)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_split_holds_out_a_seeded_validation_set(small_cifar):
    d = cifar.read_cifar10(small_cifar)
    s = cifar.split(d, val_size=50, split_seed=1, subset=400, test_subset=60)
    assert (len(s.train), len(s.val), len(s.test)) == (350, 50, 60)
    # train + val partition the first 400 training images, order kept
    both = np.concatenate([s.train.x, s.val.x]).reshape(400, -1)
    src = d.train.x[:400].reshape(400, -1)
    assert sorted(map(bytes, both)) == sorted(map(bytes, src))
    again = cifar.split(d, val_size=50, split_seed=1, subset=400)
    np.testing.assert_array_equal(again.val.x, s.val.x)
    other = cifar.split(d, val_size=50, split_seed=2, subset=400)
    assert not np.array_equal(other.val.x, s.val.x)
    with pytest.raises(DataError, match="val_size"):
        cifar.split(d, val_size=400, subset=400)
    with pytest.raises(DataError, match="subset"):
        cifar.split(d, subset=501)


def test_a_subset_reads_only_the_files_it_takes_images_from(small_cifar):
    """data.subset = 150 of 100-image files: data_batch_1 and 2 are read, the rest never opened (a damaged
    data_batch_5 goes unnoticed); the run sees the full set's first 150 images."""
    full = cifar.read_cifar10(small_cifar)
    (small_cifar / "data_batch_5").write_bytes(b"not a pickle")
    for n, images in ((150, 200), (200, 200), (201, 300)):
        part = cifar.read_cifar10(small_cifar, train_images=n)
        assert len(part.train) == images and np.array_equal(part.train.x, full.train.x[:images])
        assert np.array_equal(part.test.x, full.test.x)
    for cfg in (DataCfg(dir=str(small_cifar), subset=150, val_size=50), DataCfg(dir=str(small_cifar), subset=150)):
        s = fdata.load(cfg)
        assert len(s.train) + len(s.val or ()) == 150
    with pytest.raises(DataError, match="data_batch_5 is truncated"):
        cifar.read_cifar10(small_cifar, train_images=401)


# ------------------------------------------------------------------------------------------- order

@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [96, 100, 101])
def test_shards_are_disjoint_and_complete(n, world):
    shards = [epoch_indices(n, seed=0, epoch=4, rank=r, world=world).tolist() for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank gets the same number of images
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == (n // world) * world
    assert set(flat) <= set(range(n))
    assert shards != [epoch_indices(n, seed=0, epoch=5, rank=r, world=world).tolist() for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [100, 101, 50000])
def test_order_is_distributed_samplers(n, world):
    """The tensor-op order is exactly torch's DistributedSampler's (shuffle, drop_last), rank for rank."""
    from torch.utils.data import DistributedSampler
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=11,
                                     drop_last=True)
        sampler.set_epoch(3)
        assert epoch_indices(n, seed=11, epoch=3, rank=rank, world=world).tolist() == list(sampler)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_global_batches_do_not_depend_on_world_size(world):
    n, B = 1000, 48
    b = B // world
    one = epoch_indices(n, seed=7, epoch=2, rank=0, world=1).tolist()
    shards = [epoch_indices(n, seed=7, epoch=2, rank=r, world=world).tolist() for r in range(world)]
    steps = steps_per_epoch(n, b, world)
    assert steps == n // B
    for k in range(steps):
        assert sorted(i for s in shards for i in s[k * b:(k + 1) * b]) == sorted(one[k * B:(k + 1) * B])


def test_aug_params_ranges_and_flip_rate():
    dy, dx, flip = aug_params(20_000, seed=0, epoch=0)
    for t in (dy, dx):
        assert t.min() == 0 and t.max() == 2 * PAD
    assert 0.48 < flip.float().mean() < 0.52
    assert not torch.equal(dy, aug_params(20_000, seed=0, epoch=1)[0])



def test_alternating_flip_mirrors_each_image_every_other_epoch():
    n = 5_000
    base = aug_params(n, seed=4, epoch=0)
    assert all(torch.equal(a, b) for a, b in zip(base, aug_params(n, seed=4, epoch=0, flip="alternate")))
    prev = base[2]
    for e in range(1, 5):
        rand, alt = aug_params(n, seed=4, epoch=e), aug_params(n, seed=4, epoch=e, flip="alternate")
        assert torch.equal(alt[0], rand[0]) and torch.equal(alt[1], rand[1])  # the same crops
        assert torch.equal(alt[2], 1 - prev)  # exactly the images the epoch before left unmirrored
        assert torch.equal(alt[2], base[2] if e % 2 == 0 else 1 - base[2])
        prev = alt[2]
    assert not torch.equal(aug_params(n, seed=4, epoch=2)[2], base[2])  # random flips are drawn anew
    with pytest.raises(ValueError, match="flip"):
        aug_params(n, seed=4, epoch=1, flip="sideways")


# ------------------------------------------------------------------------------------------- loaders

def test_crop_flip_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
    padded = np.pad(x, ((0, 0), (0, 0), (PAD, PAD), (PAD, PAD)))
    idx = torch.tensor([5, 0, 3, 3])
    dy, dx, flip = torch.tensor([0, 8, 4, 2]), torch.tensor([8, 0, 4, 7]), torch.tensor([0, 1, 0, 1])
    out = crop_flip(torch.from_numpy(padded), idx, dy, dx, flip).numpy()
    for j in range(4):
        ref = padded[idx[j], :, dy[j]:dy[j] + 32, dx[j]:dx[j] + 32]
        ref = ref[:, :, ::-1] if flip[j] else ref
        np.testing.assert_array_equal(out[j], ref)
    # offset (4, 4) without flip is the un-augmented image: labels and pixels stay aligned
    np.testing.assert_array_equal(out[2], x[3])


def _loader(kind, split, flip="random", **kw):
    args = dict(batch_per_rank=32, seed=3, rank=0, world=1, device=CPU)
    args.update(kw)
    return build_loader(DataCfg(loader=kind, num_workers=2, flip=flip), split, **args)


@pytest.mark.parametrize("kind", ["gpu", "workers"])
def test_batch_contract(small_cifar, kind):
    split = cifar.read_cifar10(small_cifar).train
    loader = _loader(kind, split)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader) == 500 // 32
    x, y = batches[0]
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.device == CPU and y.device == CPU
    # each label belongs to an image whose crop matches the batch: find it through the epoch order
    order = epoch_indices(len(split), 3, 0, 0, 1)
    dy, dx, flip = aug_params(len(split), 3, 0)
    i = order[5].item()
    padded = np.pad(split.x[i], ((0, 0), (PAD, PAD), (PAD, PAD)))[:, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
    padded = padded[:, :, ::-1] if flip[i] else padded
    torch.testing.assert_close(x[5], normalize(torch.from_numpy(padded.copy()), cifar.MEAN, cifar.STD))
    assert y[5].item() == split.y[i]
    loader_cl = _loader(kind, split, channels_last=True, dtype=torch.bfloat16)
    xc, _ = next(iter(loader_cl))
    assert xc.is_contiguous(memory_format=torch.channels_last) and xc.dtype == torch.bfloat16


@pytest.mark.parametrize("flip", ["random", "alternate"])
def test_gpu_and_workers_loaders_agree_image_for_image(small_cifar, flip):
    split = cifar.read_cifar10(small_cifar).train
    for world, rank in ((1, 0), (2, 1)):
        a = _loader("gpu", split, flip, world=world, rank=rank)
        b = _loader("workers", split, flip, world=world, rank=rank)
        for epoch in (0, 1, 2):
            a.set_epoch(epoch)
            b.set_epoch(epoch)
            pairs = list(zip(a, b))
            assert len(pairs) == len(a) == len(b) == steps_per_epoch(len(split), 32, world)
            for (xa, ya), (xb, yb) in pairs:
                assert torch.equal(ya, yb) and torch.equal(xa, xb)


def test_alternating_flip_changes_only_the_mirroring():
    """Same order, same crops: each alternate-flip image is the random-flip one, mirrored where the bits differ."""
    n = 320
    x = np.random.default_rng(0).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    split = Split(x, np.arange(n, dtype=np.int64))  # each label names its image
    rand, alt = _loader("gpu", split), _loader("gpu", split, "alternate")
    for epoch in (0, 1, 2):
        rand.set_epoch(epoch)
        alt.set_epoch(epoch)
        differ = aug_params(n, 3, epoch)[2] != aug_params(n, 3, epoch, "alternate")[2]
        mirrored = 0
        for (xr, yr), (xa, ya) in zip(rand, alt):
            assert torch.equal(yr, ya)
            for j, i in enumerate(yr.tolist()):
                assert torch.equal(xa[j], xr[j].flip(-1) if differ[i] else xr[j])
                mirrored += int(differ[i])
        assert (mirrored > 0) == (epoch > 0)


def test_loader_rejects_a_set_smaller_than_a_batch(small_cifar):
    split = cifar.read_cifar10(small_cifar).train
    with pytest.raises(UserError, match="no full batch"):
        _loader("gpu", split, batch_per_rank=300, world=2, rank=0)


def test_train_size_matches_split(small_cifar):
    data = cifar.read_cifar10(small_cifar)
    for val_size, subset in ((0, 0), (50, 0), (30, 200)):
        n = len(cifar.split(data, val_size=val_size, subset=subset).train)
        assert cifar.train_size(val_size=val_size, subset=subset) == n
