"""Small archives in each OFFICIAL layout, and a loopback HTTP server with Range support.

The archives are built by the tests (a handful of images per class), so their md5 differs
from the official one: `use_archive` swaps the dataset's registry entry for one carrying the
generated archive's md5, explicitly, through monkeypatch.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pickle
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

from lambdapipe.atomic import md5_file
from lambdapipe.data import registry


def use_archive(monkeypatch, dataset: str, archive: Path, num_train: int) -> None:
    """Point DATASET's registry entry at a generated archive: its md5, size and train count."""
    info = registry.DATASETS[dataset]
    monkeypatch.setitem(registry.DATASETS, dataset, dataclasses.replace(
        info, md5=md5_file(archive), size=archive.stat().st_size, num_train=num_train))


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    ti.mtime = 0
    tf.addfile(ti, io.BytesIO(data))


def _jpeg(rng: np.random.Generator, w: int, h: int, gray: bool = False) -> bytes:
    arr = rng.integers(0, 256, size=(h, w) if gray else (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# --------------------------------------------------------------------------- CIFAR
def make_cifar(path: Path, hundred: bool, per_class: int = 3, seed: int = 0) -> dict:
    """cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} or cifar-100-python/...

    Returns the generated train/test images (NHWC) and labels for comparison.
    """
    rng = np.random.default_rng(seed)
    c = 100 if hundred else 10
    n_train, n_test = c * per_class, c * 2
    train_y = np.tile(np.arange(c), per_class)
    test_y = np.tile(np.arange(c), 2)
    train_x = rng.integers(0, 256, size=(n_train, 32, 32, 3), dtype=np.uint8)
    test_x = rng.integers(0, 256, size=(n_test, 32, 32, 3), dtype=np.uint8)

    def rows(x):  # official row layout: 1024 R, then 1024 G, then 1024 B
        return x.transpose(0, 3, 1, 2).reshape(len(x), 3072)

    key = b"fine_labels" if hundred else b"labels"
    with tarfile.open(path, "w:gz") as tf:
        if hundred:
            root = "cifar-100-python"
            names = [f"class{i:03d}".encode() for i in range(c)]
            meta = {b"fine_label_names": names, b"coarse_label_names": [b"x"] * 20}
            _add_bytes(tf, f"{root}/train", pickle.dumps(
                {b"data": rows(train_x), key: train_y.tolist(),
                 b"coarse_labels": (train_y // 5).tolist()}, protocol=2))
            _add_bytes(tf, f"{root}/test", pickle.dumps(
                {b"data": rows(test_x), key: test_y.tolist()}, protocol=2))
            _add_bytes(tf, f"{root}/meta", pickle.dumps(meta, protocol=2))
        else:
            root = "cifar-10-batches-py"
            names = [n.encode() for n in registry.DATASETS["cifar10"].classes]
            for i, chunk in enumerate(np.array_split(np.arange(n_train), 5), start=1):
                _add_bytes(tf, f"{root}/data_batch_{i}", pickle.dumps(
                    {b"batch_label": b"x", b"data": rows(train_x[chunk]),
                     key: train_y[chunk].tolist()}, protocol=2))
            _add_bytes(tf, f"{root}/test_batch", pickle.dumps(
                {b"data": rows(test_x), key: test_y.tolist()}, protocol=2))
            _add_bytes(tf, f"{root}/batches.meta", pickle.dumps({b"label_names": names},
                                                                 protocol=2))
        _add_bytes(tf, f"{root}/readme.html", b"<html></html>")
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y,
            "classes": [n.decode() for n in names]}


# --------------------------------------------------------------------------- Tiny ImageNet
def make_tinyimagenet(path: Path, num_classes: int = 200, per_class: int = 2,
                      seed: int = 0) -> dict:
    """tiny-imagenet-200/ with wnids.txt, words.txt, train/<wnid>/images, val/ + annotations."""
    rng = np.random.default_rng(seed)
    wnids = [f"n{9000000 - 7 * i:08d}" for i in range(num_classes)]  # not in sorted order
    root = "tiny-imagenet-200"
    val_lines = []
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{root}/wnids.txt", "\n".join(wnids) + "\n")
        zf.writestr(f"{root}/words.txt", "".join(f"{w}\tthing {w}, alias\n" for w in wnids)
                    + "n00000001\tunused entry\n")
        for ci, w in enumerate(wnids):
            zf.writestr(f"{root}/train/{w}/{w}_boxes.txt", "")
            for j in range(per_class):
                gray = (ci + j) % 7 == 0  # the real set has some grayscale JPEGs
                zf.writestr(f"{root}/train/{w}/images/{w}_{j}.JPEG", _jpeg(rng, 64, 64, gray))
            name = f"val_{ci}.JPEG"
            zf.writestr(f"{root}/val/images/{name}", _jpeg(rng, 64, 64))
            val_lines.append(f"{name}\t{w}\t0\t0\t63\t63")
        zf.writestr(f"{root}/val/val_annotations.txt", "\n".join(val_lines) + "\n")
        zf.writestr(f"{root}/test/images/test_0.JPEG", _jpeg(rng, 64, 64))
    return {"wnids": sorted(wnids), "num_train": num_classes * per_class,
            "num_test": num_classes}


# --------------------------------------------------------------------------- Imagenette
NETTE_WNIDS = [w for w, _ in registry.IMAGENETTE_WNIDS]


def make_imagenette(path: Path, train_per_class: int = 6, val_per_class: int = 2,
                    seed: int = 0, mislabel: tuple[str, ...] = ()) -> dict:
    """imagenette2-160/{train,val}/<wnid>/*.JPEG + noisy_imagenette.csv (is_valid marks val).

    `mislabel`: paths (`train/<wnid>/<wnid>_<j>.JPEG`) whose noisy_labels_0 names the next
    class instead of the folder's, as a CSV from another archive or an edited one would.
    """
    rng = np.random.default_rng(seed)
    root = "imagenette2-160"
    rows = []
    with tarfile.open(path, "w:gz") as tf:
        for split, per in (("train", train_per_class), ("val", val_per_class)):
            for ci, w in enumerate(NETTE_WNIDS):
                for j in range(per):
                    rel = f"{split}/{w}/{w}_{j}.JPEG"
                    # Landscape and portrait shapes exercise resize-shorter-side + crop.
                    size = (40 + 3 * j, 30) if j % 2 else (30, 44 + j)
                    _add_bytes(tf, f"{root}/{rel}", _jpeg(rng, *size))
                    clean = NETTE_WNIDS[(ci + 1) % 10] if rel in mislabel else w
                    row = {"path": rel, "noisy_labels_0": clean, "is_valid": split == "val"}
                    for pct, rate in ((1, 0.01), (5, 0.05), (25, 0.25), (50, 0.5)):
                        flip = rng.random() < rate
                        other = NETTE_WNIDS[(ci + 1 + rng.integers(9)) % 10]
                        row[f"noisy_labels_{pct}"] = other if flip else w
                    rows.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=["path", "noisy_labels_0", "noisy_labels_1",
                                                 "noisy_labels_5", "noisy_labels_25",
                                                 "noisy_labels_50", "is_valid"])
        writer.writeheader()
        writer.writerows(rows)
        _add_bytes(tf, f"{root}/noisy_imagenette.csv", buf.getvalue().encode())
    return {"rows": rows, "num_train": 10 * train_per_class, "num_test": 10 * val_per_class}


# --------------------------------------------------------------------------- HTTP server
class ArchiveServer:
    """Serves files from `root` on 127.0.0.1 with Range support and fault injection.

    `break_after` (bytes): announce the full length but close the connection after that
    many bytes of the body, once, the way a dropped transfer looks to the client.
    `redirects` ({path: url}): answer 302 with that Location instead.
    """

    def __init__(self, root: Path):
        self.root = root
        self.break_after: int | None = None
        self.requests: list[dict] = []
        self.redirects: dict[str, str] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):  # noqa: N802 - http.server's naming
                path = server.root / self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append({"path": self.path, "range": rng})
                if self.path in server.redirects:
                    self.send_response(302)
                    self.send_header("Location", server.redirects[self.path])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                start = 0
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.break_after is not None:
                    cut, server.break_after = server.break_after, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

