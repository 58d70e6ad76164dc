"""Storage by URI (:mod:`vipe_ray.storage`) against a real S3 endpoint: moto's server, started here on
127.0.0.1. The AWS variables (endpoint, credentials, region) exist only in these tests' environment: set with
``monkeypatch`` in-process, passed explicitly to the sweep's subprocesses.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from vipe_ray import storage
from vipe_ray.data import DataError, file_sha256, load_table, read_metadata

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "data" / "cmu_h36m17_30fps.parquet"
BUCKET = "vipe-ray-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on 127.0.0.1 with one bucket; yields the AWS variables that reach it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing",
                               secret_key="testing", region="us-east-1", allow_bucket_creation=True)
        fs.create_dir(BUCKET)
        yield env
    finally:
        server.stop()


@pytest.fixture
def s3(s3_env, monkeypatch):
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    return s3_env


def test_local_paths_and_uris_parse(tmp_path):
    local = storage.location(tmp_path / "a")
    assert local.is_local and local.uri == str((tmp_path / "a").resolve()) and local.ray_storage() == {
        "storage_path": str((tmp_path / "a").resolve()), "storage_filesystem": None}
    assert storage.location(f"file://{tmp_path}/a").uri == local.uri
    assert not storage.is_uri(str(tmp_path)) and not storage.is_uri("file:///x") and storage.is_uri("s3://b/p")
    with pytest.raises(storage.StorageError, match="name a bucket"):
        storage.location("s3://")
    with pytest.raises(storage.StorageError, match="foo://x/y: not a usable storage URI"):
        storage.location("foo://x/y")


def test_s3_location_round_trip(s3, tmp_path):
    root = storage.location(f"s3://{BUCKET}/unit/")
    assert root.uri == f"s3://{BUCKET}/unit" and root.path == f"{BUCKET}/unit" and not root.is_local
    assert root.ray_storage()["storage_filesystem"] is root.fs
    root.check_access()
    note = root / "run-1" / "note.txt"
    assert not note.exists()
    note.write_text("parent-run-id\n")
    (root / "run-2" / "x.txt").write_text("x")
    assert note.exists() and note.read_text() == "parent-run-id\n"
    assert [d.name for d in root.subdirs()] == ["run-1", "run-2"] and (root / "run-1").is_dir()
    copy = (root / "run-1").download(tmp_path)
    assert (copy / "note.txt").read_text() == "parent-run-id\n"
    assert not list(Path.cwd().glob("s3:*")), "no local folder named after the URI"
    # The endpoint travels with a pickled filesystem (to Ray workers); credentials do not.
    import pickle

    options = pickle.loads(pickle.dumps(root.fs)).__reduce__()[1][0]
    assert options["endpoint_override"] == s3["AWS_ENDPOINT_URL"] and options["secret_key"] is None


def test_missing_bucket_or_endpoint_fails_clearly(s3, monkeypatch):
    with pytest.raises(storage.StorageError, match=r"bucket 'no-such-bucket' does not exist at http://127\.0\.0\.1"):
        storage.location("s3://no-such-bucket/p").check_access()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    with pytest.raises(storage.StorageError, match="cannot access.*AWS_ACCESS_KEY_ID"):
        storage.location(f"s3://{BUCKET}/p").check_access()


def test_pose_table_on_s3_reads_like_the_local_file(s3):
    uri = f"s3://{BUCKET}/data/table.parquet"
    storage.copy_tree(TABLE, uri)
    remote, local = load_table(uri), load_table(TABLE)
    assert remote.path == uri and remote.checksum == local.checksum == file_sha256(uri)
    assert (remote.joints == local.joints).all() and remote.subjects == local.subjects
    assert read_metadata(uri)["fps"] == 30
    with pytest.raises(DataError, match=f"s3://{BUCKET}/data/missing.parquet: pose table not found"):
        load_table(f"s3://{BUCKET}/data/missing.parquet")
