"""S3 backend: ``s3://bucket/prefix`` through boto3.

Endpoint, region and credentials come from the standard AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``...). Create-once is ``PutObject`` with ``If-None-Match: *``;
compare-and-swap is ``PutObject`` with ``If-Match: <etag>``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from ..errors import RegistryConfigError, RegistryReadOnly, RegistryUnavailable
from .base import ObjectExists, ObjectInfo, ObjectStore, PreconditionFailed, StoredObject, check_key

_PRECONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def _client_error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


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
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = client or _make_client()

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _errors(self):
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

        try:
            yield
        except (EndpointConnectionError, ConnectionError) as exc:
            raise RegistryUnavailable(f"S3 registry {self.uri} is unreachable: {exc}") from exc
        except ClientError as exc:
            code = _client_error_code(exc)
            if code == "NoSuchBucket":
                raise RegistryConfigError(f"S3 bucket {self.bucket!r} does not exist") from exc
            if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
                raise RegistryReadOnly(f"S3 registry {self.uri} refused access ({code})") from exc
            if code.startswith("5") or code in {"ServiceUnavailable", "SlowDown", "InternalError"}:
                raise RegistryUnavailable(f"S3 registry {self.uri} failed ({code})") from exc
            raise
        except BotoCoreError as exc:
            raise RegistryUnavailable(f"S3 registry {self.uri} failed: {exc}") from exc

    def read(self, key: str) -> StoredObject | None:
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if _client_error_code(exc) in _MISSING_CODES:
                    return None
                raise
            return StoredObject(data=response["Body"].read(), token=response["ETag"])

    def _conditional_put(self, key: str, data: bytes, **condition) -> None:
        from botocore.exceptions import ClientError

        with self._errors():
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
        with self._errors():
            if self.exists(key):  # refresh its timestamp, so gc's grace period starts again
                self._client.copy_object(Bucket=self.bucket, Key=self._key(key), MetadataDirective="REPLACE",
                                         CopySource={"Bucket": self.bucket, "Key": self._key(key)})
                return
            self._client.upload_file(str(source), self.bucket, self._key(key))

    def open_blob(self, key: str) -> BinaryIO | None:
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                return self._client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
            except ClientError as exc:
                if _client_error_code(exc) in _MISSING_CODES:
                    return None
                raise

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                self._client.head_object(Bucket=self.bucket, Key=self._key(key))
                return True
            except ClientError as exc:
                if _client_error_code(exc) in _MISSING_CODES:
                    return False
                raise

    def info(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        with self._errors():
            try:
                head = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as exc:
                if _client_error_code(exc) in _MISSING_CODES:
                    return None
                raise
            return ObjectInfo(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    def delete(self, key: str) -> None:
        with self._errors():
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
