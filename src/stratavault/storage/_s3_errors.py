"""How :class:`S3Storage` names what went wrong: botocore's exceptions and the store's
error codes mapped to the classes of ``stratavault.errors``, with a message that says
where and what to do."""

from __future__ import annotations

import botocore.exceptions

from stratavault.errors import (
    ObjectExistsError,
    ObjectNotFoundError,
    PermissionDeniedError,
    StorageError,
    StorageFullError,
    TransientStorageError,
)

__all__ = ["BOTO_ERRORS", "error_code", "http_status", "s3_error"]

BOTO_ERRORS = (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)
"""What a boto3 call raises."""

_BAD_CREDENTIALS = {
    "InvalidAccessKeyId": "the access key id is unknown to the store",
    "SignatureDoesNotMatch": "the secret key does not match the access key id",
    "InvalidToken": "the session token is invalid",
    "ExpiredToken": "the session token has expired",
    "TokenRefreshRequired": "the session token has expired",
    "AuthorizationHeaderMalformed": "the request signature is malformed (wrong region?)",
}
_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
    "OperationAborted", "BadDigest", "IncompleteBody",
}  # fmt: skip
_FULL_CODES = {"QuotaExceeded", "XMinioStorageFull", "InsufficientStorage", "EntityTooLarge"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound", "NoSuchVersion"}


def error_code(e: botocore.exceptions.ClientError) -> str:
    """The store's error code ("NoSuchKey", "SlowDown", ...)."""
    return str(e.response.get("Error", {}).get("Code", ""))


def http_status(e: botocore.exceptions.ClientError) -> int:
    """The HTTP status of the answer (0 when there was none)."""
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def s3_error(
    e: Exception, *, where: str, operation: str, no_bucket: str, locked_bucket: str | None
) -> StorageError:
    """Our error for ``e`` raised by ``operation`` (``where``: the operation, object and
    location, for the message; ``no_bucket``: the message for a missing bucket;
    ``locked_bucket``: the bucket when objects are written with object lock)."""
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        return PermissionDeniedError(
            f"{where} - no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE for a profile in ~/.aws/credentials"
        )
    if isinstance(e, botocore.exceptions.ClientError):
        return _client_error(e, where, operation, no_bucket, locked_bucket)
    if isinstance(e, botocore.exceptions.EndpointConnectionError):
        return TransientStorageError(f"{where} - cannot connect to {e.kwargs.get('endpoint_url')}")
    if isinstance(
        e,
        botocore.exceptions.ConnectionError
        | botocore.exceptions.HTTPClientError
        | botocore.exceptions.IncompleteReadError
        | botocore.exceptions.ResponseStreamingError,
    ):
        return TransientStorageError(f"{where} - connection failed: {e}")
    return StorageError(f"{where} - {e}")


def _client_error(
    e: botocore.exceptions.ClientError,
    where: str,
    operation: str,
    no_bucket: str,
    locked_bucket: str | None,
) -> StorageError:
    code, status = error_code(e), http_status(e)
    message = e.response.get("Error", {}).get("Message") or code
    if code == "NoSuchBucket":
        return StorageError(no_bucket)
    if code in _BAD_CREDENTIALS:
        return PermissionDeniedError(
            f"{where} - credentials rejected: {_BAD_CREDENTIALS[code]} ({code})"
        )
    if code in _NOT_FOUND_CODES or status == 404:
        return ObjectNotFoundError(f"{where} - no such object")
    if status == 412 and operation == "put":
        return ObjectExistsError(f"{where} - object exists")
    if status == 412:  # a ranged read whose If-Match no longer holds
        return TransientStorageError(f"{where} - the object changed while being read")
    if code == "AccessDenied" or status == 403:
        return PermissionDeniedError(
            f"{where} - access denied: these credentials may not {operation} here ({message})"
        )
    if code in _FULL_CODES or status == 507:
        return StorageFullError(f"{where} - no space left ({code}: {message})")
    if code in _TRANSIENT_CODES or status in (429, 500, 502, 503, 504):
        return TransientStorageError(f"{where} - the store is busy or failing ({code})")
    if code == "InvalidRequest" and locked_bucket is not None:
        return StorageError(
            f"{where} - refused ({message}); is object lock enabled on bucket {locked_bucket!r}?"
        )
    return StorageError(f"{where} - {code} (HTTP {status}): {message}")
