"""A CIFAR-10 download source on 127.0.0.1, for testing TFDS's real download path without internet.

`write_archive` writes a small cifar-10-binary.tar.gz in the real format (cifar-10-batches-bin/ with
data_batch_1..5.bin, test_batch.bin and batches.meta.txt; each record one label byte and the image
as three 32x32 planes R, G, B). `ArchiveServer` serves it over HTTP, whole or cut off half-way, and
counts requests. `redirect_cifar10` points TFDS's cifar10 builder at that server, with the archive's
size and SHA-256 registered as TFDS registers the real one, so that TFDS verifies the download.
"""

import hashlib
import http.server
import io
import os
import tarfile
import threading

import numpy as np

CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ARCHIVE_NAME = "cifar-10-binary.tar.gz"


def _records(images, labels):
    """The binary batch file: per image its label byte, then its R, G and B planes (row-major)."""
    planes = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels[:, None].astype(np.uint8), planes], axis=1).tobytes()


def write_archive(path, train_per_batch=4, test_count=6, seed=0):
    """Writes the archive to `path`; returns {"train": (images, labels), "test": (...)}, uint8 [N, 32, 32, 3]."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split, count in (("train", 5 * train_per_batch), ("test", test_count)):
        splits[split] = (
            rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
            (np.arange(count) % len(CLASS_NAMES)).astype(np.uint8),
        )
    files = {"batches.meta.txt": ("\n".join(CLASS_NAMES) + "\n").encode()}
    train_images, train_labels = splits["train"]
    for batch in range(5):
        part = slice(batch * train_per_batch, (batch + 1) * train_per_batch)
        files[f"data_batch_{batch + 1}.bin"] = _records(train_images[part], train_labels[part])
    files["test_batch.bin"] = _records(*splits["test"])
    with tarfile.open(path, "w:gz") as archive:
        for name, content in files.items():
            member = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            member.size = len(content)
            archive.addfile(member, io.BytesIO(content))
    return splits


class ArchiveServer:
    """Serves one file at every path on 127.0.0.1. `mode`: "whole", or "cut" (the full Content-Length
    is announced, half the bytes sent, then the connection closed). Counts GET and HEAD requests."""

    def __init__(self, path):
        with open(path, "rb") as file:
            self.content = file.read()
        self.mode = "whole"
        self.requests = {"GET": 0, "HEAD": 0}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _headers(self):
                self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(server.content)))
                self.end_headers()

            def do_HEAD(self):  # noqa: N802 (the name http.server calls)
                server.requests["HEAD"] += 1
                self._headers()

            def do_GET(self):  # noqa: N802
                server.requests["GET"] += 1
                self._headers()
                body = server.content if server.mode == "whole" else server.content[: len(server.content) // 2]
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/{ARCHIVE_NAME}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._httpd.shutdown()
        self._httpd.server_close()


def redirect_cifar10(setattr_, url, content):
    """Points TFDS's cifar10 builder at `url`, registering `content`'s size and SHA-256 for it.

    `setattr_` is `monkeypatch.setattr` in a test, or plain `setattr` in a child process.
    """
    from tensorflow_datasets.core.download import checksums
    from tensorflow_datasets.image_classification import cifar

    original = cifar.Cifar10._cifar_info
    setattr_(cifar.Cifar10, "_cifar_info", property(lambda self: original.fget(self)._replace(url=url)))
    info = checksums.UrlInfo(size=len(content), checksum=hashlib.sha256(content).hexdigest(), filename=ARCHIVE_NAME)
    setattr_(cifar.Cifar10, "url_infos", {url: info})


def redirect_from_environment():
    """In a child process: `redirect_cifar10` to $TEST_CIFAR10_URL serving the file $TEST_CIFAR10_ARCHIVE."""
    with open(os.environ["TEST_CIFAR10_ARCHIVE"], "rb") as file:
        redirect_cifar10(setattr, os.environ["TEST_CIFAR10_URL"], file.read())
