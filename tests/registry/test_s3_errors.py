"""Every S3 failure reaches the CLI as one line naming the bucket/key and what to do (real SeaweedFS)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import S3_BUCKET, write_lora

from lorafleet.local_cluster import free_port


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorafleet.cli", *args], capture_output=True, text=True,
                          timeout=180, env={**os.environ, **env})


CASES = {
    "bucket-missing": (["registry", "list", "--registry", "s3://no-such-bucket-here/reg"], {},
                       ["no-such-bucket-here", "does not exist", "registry init"]),
    "invalid-bucket-name": (["registry", "list", "--registry", "s3://lf/reg"], {}, ["'lf'", "3-63 characters"]),
    "access-denied": (["registry", "list", "--registry", f"s3://{S3_BUCKET}/reg"],
                      {"AWS_SECRET_ACCESS_KEY": "wrong-secret"}, [S3_BUCKET, "refused access", "AWS_SECRET_ACCESS_KEY"]),
    "endpoint-unreachable": (["registry", "list", "--registry", f"s3://{S3_BUCKET}/reg"],
                             {"AWS_ENDPOINT_URL": "http://127.0.0.1:{port}", "LORAFLEET_S3_MAX_ATTEMPTS": "1"},
                             ["unreachable", "AWS_ENDPOINT_URL", "127.0.0.1"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_s3_failures_are_one_line_errors(seaweed, case):
    args, env, words = CASES[case]
    env = {k: v.format(port=free_port()) for k, v in env.items()}
    result = _cli(args, env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


def test_publishing_to_a_bucket_the_server_refuses_is_one_line(seaweed, tiny_spec, tmp_path):
    """The case a user met: s3://lf/reg (too short for S3) printed boto3's S3UploadFailedError stack."""
    source = write_lora(tmp_path, tiny_spec)
    result = _cli(["registry", "publish", str(source), "--name", "x", "--registry", "s3://lf/reg"], {})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "'lf'" in result.stderr and "bucket" in result.stderr


def test_the_server_side_refusal_of_a_bucket_name_is_mapped_too(seaweed, tmp_path):
    """A name that passes our check but the server refuses still becomes a one-line error."""
    from lorafleet.registry.errors import RegistryConfigError, RegistryUnavailable
    from lorafleet.registry.storage import S3Store

    store = S3Store(bucket=S3_BUCKET, prefix="p")
    store.bucket = "lf"  # bypass our own check to reach the server's
    source = tmp_path / "blob"
    source.write_bytes(b"x")
    with pytest.raises((RegistryConfigError, RegistryUnavailable)) as caught:
        store.put_blob("blobs/sha256/00/ab", source)
    assert "lf" in str(caught.value)
