"""S3 backend: ``s3://bucket/prefix`` through boto3.

Endpoint, region and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``...). Create-once is ``PutObject`` with ``If-None-Match: *``;
compare-and-swap is ``PutObject`` with ``If-Match: <etag>``.
"""

from __future__ import annotations

# Imports inside functions: boto3 only for an s3:// registry.
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ..errors import RegistryAccessDenied, RegistryConfigError, RegistryUnavailable
from .base import ObjectExists, ObjectInfo, ObjectStore, PreconditionFailed, StoredObject, check_key

_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def _client_error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


_DENIED_CODES = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
_KNOWN_CODES = ("NoSuchBucket", "InvalidBucketName", *sorted(_DENIED_CODES))
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def _client_error(code: str, where: str, bucket: str) -> Exception:
    """The lorafleet error for an S3 error code, with the fix in its message."""
    if code == "NoSuchBucket":
        return RegistryConfigError(f"S3 bucket {bucket!r} does not exist ({where}): create it with "
                                   f"`lorafleet registry init --registry s3://{bucket}/...` or fix the URI")
    if code == "InvalidBucketName":
        return RegistryConfigError(f"the S3 server refuses the bucket name {bucket!r}: " + _BUCKET_RULES)
    if code in _DENIED_CODES:
        return RegistryAccessDenied(f"S3 refused access to {where} ({code}): check AWS_ACCESS_KEY_ID / "
                                    "AWS_SECRET_ACCESS_KEY and the bucket's policy")
    if code.startswith("5") or code in {"ServiceUnavailable", "SlowDown", "InternalError"}:
        return RegistryUnavailable(f"S3 server failed for {where} ({code}); try again")
    return RegistryUnavailable(f"S3 request for {where} failed ({code or 'unknown error'})")


_BUCKET_RULES = ("S3 bucket names are 3-63 characters of a-z, 0-9, '.' and '-', starting and ending with a "
                 "letter or digit")


def _make_client():
    import boto3
    from botocore.config import Config

    config = Config(
        connect_timeout=float(os.environ.get("LORAFLEET_S3_CONNECT_TIMEOUT", "3")),
        read_timeout=float(os.environ.get("LORAFLEET_S3_READ_TIMEOUT", "30")),
        retries={"max_attempts": int(os.environ.get("LORAFLEET_S3_MAX_ATTEMPTS", "3")), "mode": "standard"},
        s3={"addressing_style": os.environ.get("LORAFLEET_S3_ADDRESSING_STYLE", "path")},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.session.Session().client("s3", config=config)


class S3Store(ObjectStore):
    def __init__(self, bucket: str, prefix: str, client=None):
        if not bucket:
            raise RegistryConfigError("s3 registry URI needs a bucket: s3://BUCKET/PREFIX")
        if not _BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
            raise RegistryConfigError(f"invalid S3 bucket name {bucket!r}: {_BUCKET_RULES}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = client or _make_client()

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _errors(self, key: str | None = None):
        """Every boto3/botocore failure as a lorafleet error naming the bucket/key and what to do."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        where = f"s3://{self.bucket}/{self._key(key)}" if key else f"bucket {self.bucket!r}"
        try:
            yield
        except (EndpointConnectionError, ConnectionError) as exc:
            raise RegistryUnavailable(
                f"S3 endpoint {self._endpoint()} is unreachable ({where}): check AWS_ENDPOINT_URL and that "
                "the server is up") from exc
        except NoCredentialsError as exc:
            raise RegistryAccessDenied(
                f"no S3 credentials for {where}: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from exc
        except ClientError as exc:
            raise _client_error(_client_error_code(exc), where, self.bucket) from exc
        except S3UploadFailedError as exc:  # upload_file wraps the ClientError's text, not the error
            code = next((c for c in _KNOWN_CODES if c in str(exc)), "UploadFailed")
            raise _client_error(code, where, self.bucket) from exc
        except BotoCoreError as exc:
            raise RegistryUnavailable(f"S3 request for {where} failed: {exc}") from exc

    def _endpoint(self) -> str:
        return getattr(getattr(self._client, "meta", None), "endpoint_url", None) or "(AWS default)"

    def _if_present(self, key: str, operation: str):
        """The response of ``operation`` (get_object, head_object) on ``key``, or None when absent."""
        from botocore.exceptions import ClientError

        with self._errors(key):
            try:
                return getattr(self._client, operation)(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if _client_error_code(exc) in _MISSING_CODES:
                    return None
                raise

    def read(self, key: str) -> StoredObject | None:
        response = self._if_present(key, "get_object")
        if response is None:
            return None
        with self._errors(key):
            return StoredObject(data=response["Body"].read(), token=response["ETag"])

    def _conditional_put(self, key: str, data: bytes, **condition) -> None:
        from botocore.exceptions import ClientError

        with self._errors(key):
            try:
                self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
            except ClientError as exc:
                if _client_error_code(exc) in _PRECONDITION_CODES:
                    raise PreconditionFailed(f"{key}: condition failed") from exc
                raise

    def create(self, key: str, data: bytes) -> None:
        try:
            self._conditional_put(key, data, IfNoneMatch="*")
        except PreconditionFailed as exc:
            raise ObjectExists(f"{key} already exists") from exc

    def compare_and_swap(self, key: str, data: bytes, expected_token: str | None) -> None:
        if expected_token is None:
            self._conditional_put(key, data, IfNoneMatch="*")
        else:
            self._conditional_put(key, data, IfMatch=expected_token)

    def put_blob(self, key: str, source: Path) -> None:
        with self._errors(key):
            if self.exists(key):  # refresh its timestamp, so gc's grace period starts again
                self._client.copy_object(Bucket=self.bucket, Key=self._key(key), MetadataDirective="REPLACE",
                                         CopySource={"Bucket": self.bucket, "Key": self._key(key)})
                return
            self._client.upload_file(str(source), self.bucket, self._key(key))

    def open_blob(self, key: str) -> BinaryIO | None:
        response = self._if_present(key, "get_object")
        return None if response is None else response["Body"]

    def exists(self, key: str) -> bool:
        return self._if_present(key, "head_object") is not None

    def info(self, key: str) -> ObjectInfo | None:
        head = self._if_present(key, "head_object")
        return None if head is None else ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        with self._errors(key):
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        with self._errors():
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full_prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    modified = item["LastModified"].timestamp()
                    yield ObjectInfo(item["Key"][strip:], int(item["Size"]), modified)

    def check(self) -> None:
        with self._errors():
            self._client.head_bucket(Bucket=self.bucket)

    def create_bucket(self) -> None:
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                self._client.create_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _client_error_code(exc) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise
