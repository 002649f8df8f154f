"""Where a named dataset's images come from: a local copy, or TFDS, which downloads on first use.

`--dataset=cifar10` (or cifar100, stl10, imagenet2012) is looked up in this order:

1. The local-copy override, for machines without internet: the environment variable
   SIMCLR_KERAS_LOCAL_DATA names a folder ROOT of local copies. ROOT/cifar10 (or ROOT itself, when
   its name is cifar10) is read and nothing is downloaded. A copy is either an image folder in the
   `keras.utils.image_dataset_from_directory` layout (train/<class>/*.png, test/<class>/..., as
   `python -m simclr_keras.prepare_data` writes it) or a prepared TFDS directory (ROOT/cifar10/3.0.2/,
   as `tfds build cifar10 --data_dir=ROOT` writes it). A dataset ROOT does not hold goes on to 2.
2. TFDS in `data_dir` (None: TFDS's own, $TFDS_DATA_DIR or ~/tensorflow_datasets): a prepared copy is
   read as it is; otherwise TFDS downloads and prepares it there first, with its progress bars.
   ImageNet cannot be downloaded: TFDS prepares it from the two archives the user places in
   DATA_DIR/downloads/manual/, and the error says so.

Interruptions. TFDS writes a dataset into a temporary folder that it renames only when complete, so a
half-prepared dataset is never read. One process at a time prepares datasets in a data_dir (an
flock on DATA_DIR/.simclr_keras_prepare.lock; others wait), and the holder first deletes what
interrupted attempts at that dataset left (partial downloads, half extractions and half-written
dataset folders): a rerun downloads and prepares afresh.

Offline. TFDS retries a connection that fails for more than three minutes. Before downloading, each
source URL gets one request with a short timeout, so that a machine without internet stops in
seconds with one line giving the reason and the override.

Imports neither TensorFlow nor TFDS at module level.
"""

import contextlib
import fcntl
import glob
import os
import re
import shutil
import sys

LOCAL_DATA_ENV = "SIMCLR_KERAS_LOCAL_DATA"
TFDS_DATASETS = ("cifar10", "cifar100", "stl10", "imagenet2012")
MANUAL_DOWNLOADS = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}
LOCK_FILE = ".simclr_keras_prepare.lock"
# Seconds the reachability check waits for a source's server to answer.
REACHABILITY_TIMEOUT = 15
OVERRIDE_HINT = (
    f"set {LOCAL_DATA_ENV}=ROOT to a folder holding a local copy as ROOT/{{name}} (an image folder with "
    "train/ and test/, or a prepared TFDS directory)"
)


class DatasetNotFoundError(ValueError):
    """The dataset or split cannot be read; the message says what to pass instead."""


class DatasetDownloadError(DatasetNotFoundError):
    """A TFDS dataset is not prepared and could not be downloaded; the message gives the reason."""


def local_copy(name):
    """The path of `name`'s copy under $SIMCLR_KERAS_LOCAL_DATA (ROOT/name, or ROOT named `name`), or None."""
    root = os.environ.get(LOCAL_DATA_ENV)
    if not root:
        return None
    root = os.path.expanduser(root)
    for candidate in (os.path.join(root, name), root):
        if os.path.basename(os.path.normpath(candidate)) == name and os.path.isdir(candidate):
            return candidate
    return None


def is_image_folder(path):
    """Whether `path` has the layout of an image folder: a train/ folder of class folders."""
    return os.path.isdir(os.path.join(path, "train"))


def source_of(name, data_dir=None):
    """Where `name`'s images are read: an image folder's path (str) or a prepared TFDS builder."""
    copy = local_copy(name)
    if copy is None:
        return prepared_builder(name, data_dir)
    if is_image_folder(copy):
        return copy
    return _local_builder(name, copy)


def _local_builder(name, copy):
    """The builder of a prepared TFDS copy at `copy` = DATA_DIR/name; never downloads."""
    import tensorflow_datasets as tfds

    if glob.glob(os.path.join(copy, "*", "dataset_info.json")):
        builder = tfds.builder(name, data_dir=os.path.dirname(os.path.normpath(copy)))
        if builder.is_prepared():
            return builder
    raise DatasetNotFoundError(
        f"--dataset={name}: the local copy {copy} (from {LOCAL_DATA_ENV}) is neither an image folder (no "
        f"train/ folder) nor a TFDS directory prepared by this TFDS version (no {copy}/VERSION/dataset_info.json)."
    )


def prepared_builder(name, data_dir=None):
    """The TFDS builder of `name` in `data_dir`, downloaded and prepared there first if needed."""
    import tensorflow_datasets as tfds  # slow, and only needed for TFDS datasets

    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
        return builder
    with _preparation_lock(str(builder.data_dir_root)):
        builder = tfds.builder(name, data_dir=data_dir)  # another process may have prepared it meanwhile
        if not builder.is_prepared():
            _remove_interrupted_attempts(builder)
            _prepare(builder)
    return builder


def _prepare(builder):
    name, root = builder.name, str(builder.data_dir_root)
    if name in MANUAL_DOWNLOADS:
        _check_manual_files(name, root)
    else:
        _check_reachable(name, root, sorted(builder.url_infos or ()))
    try:
        builder.download_and_prepare()
    except Exception as error:  # requests, TFDS's DownloadError and NonMatchingChecksumError, OSError
        raise DatasetDownloadError(
            f"--dataset={name} could not be downloaded and prepared in {root} ({_reason(error)}). Rerun to "
            f"start again (interrupted downloads are redone), or {OVERRIDE_HINT.format(name=name)}."
        ) from error


def _check_manual_files(name, root):
    manual_dir = os.path.join(root, "downloads", "manual")
    missing = [file for file in MANUAL_DOWNLOADS[name] if not os.path.isfile(os.path.join(manual_dir, file))]
    if missing:
        raise DatasetDownloadError(
            f"--dataset={name} is not prepared in {root} and cannot be downloaded automatically: download "
            f"{' and '.join(MANUAL_DOWNLOADS[name])} (registration at https://image-net.org) into "
            f"{manual_dir}/ (missing: {', '.join(missing)}) and rerun; TFDS then prepares it there."
        )


def _check_reachable(name, root, urls):
    """One request per source URL with a short timeout; raises DatasetDownloadError for the first that fails."""
    import requests  # TFDS's own HTTP client; honours HTTP(S)_PROXY like its downloads do

    for url in urls:
        try:
            requests.head(url, timeout=REACHABILITY_TIMEOUT, allow_redirects=False).close()
        except requests.RequestException as error:
            raise DatasetDownloadError(
                f"--dataset={name} is not prepared in {root} and cannot be downloaded: {url} is unreachable "
                f"({_reason(error)}). Connect to the internet and rerun, or {OVERRIDE_HINT.format(name=name)}."
            ) from error


def _reason(error):
    """The innermost cause of a (requests, urllib3 or TFDS) exception, on one line."""
    causes = [error]
    while len(causes) < 10:  # requests wraps urllib3's MaxRetryError, which wraps the socket's error
        inner = getattr(causes[-1], "reason", None) or getattr(causes[-1], "original_error", None)
        inner = inner or next((arg for arg in causes[-1].args if isinstance(arg, BaseException)), None)
        if not isinstance(inner, BaseException):
            break
        causes.append(inner)
    text = " ".join(str(causes[-1]).split()) or type(causes[-1]).__name__
    # urllib3 starts with the connection: "<...HTTPSConnection object at 0x..>: " or "HTTPSConnection(host=...): ".
    text = re.sub(r"^(<[^>]*>|\w+\(host=[^)]*\)): ", "", text)
    if any("proxy" in type(cause).__name__.lower() for cause in causes):
        text = f"through the proxy: {text}"
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def _preparation_lock(root):
    """An exclusive flock on ROOT/.simclr_keras_prepare.lock, waited for (another process prepares)."""
    if "://" in root:  # gs:// and other remote data_dirs: no local lock to take
        yield
        return
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, LOCK_FILE), "a+", encoding="utf-8") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process preparing a dataset in {root} ...", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_interrupted_attempts(builder):
    """Deletes what interrupted preparations of this dataset left; called with the lock held."""
    root = str(builder.data_dir_root)
    if "://" in root:
        return
    downloads = os.path.join(root, "downloads")
    finished = [entry for entry in glob.glob(os.path.join(downloads, builder.name, "*")) if ".tmp." not in entry]
    leftovers = glob.glob(os.path.join(downloads, builder.name, "*.tmp.*"))  # partial downloads
    leftovers += glob.glob(os.path.join(root, builder.name, "incomplete.*"))  # half-written dataset folders
    for download in finished:  # half extractions of this dataset's archives
        leftovers += glob.glob(os.path.join(downloads, "extracted", f"incomplete.*.{os.path.basename(download)}*"))
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
