"""Copies a kiln model repository from S3 (or an S3-compatible store) into a local folder.

The image's entrypoint runs it before tritonserver when KILN_REPOSITORY_COPY_TO is set (the Helm
chart's default for an s3:// repository), and Triton then serves the local copy. Why not let
Triton read the bucket itself: Triton 2.51 downloads each model's folder on its own into a
temporary folder of its own, so a kiln model that reads another model's files finds nothing beside
it. Measured here with the embedded tritonserver on a bucket of moto's S3 server that `kiln publish
--model fraud_scorer` filled: `fraud` loaded, but fraud_scorer (a fused pipeline: its steps'
folders), fraud_features (`features.json` of `fraud`) and fraud_threshold (`decision.json`) failed
with "... not found under <mount>/fraud". KServe's storage initializer copies the whole
repository the same way before its server starts.

Usage (python3 in the image, where kiln is installed):
    python3 /opt/kiln/fetch_repository.py s3://BUCKET/PREFIX /var/lib/kiln/repository

The URL takes the forms Triton and `kiln publish` take (kiln.publish_remote.parse_location):
s3://BUCKET/PREFIX for AWS, s3://http(s)://HOST:PORT/BUCKET/PREFIX for an S3-compatible store
(MinIO, Ceph; Google Cloud Storage through its S3-compatible endpoint with HMAC keys:
s3://https://storage.googleapis.com:443/BUCKET/PREFIX). Credentials come from boto3's chain
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, a web identity token as EKS gives).

The destination must be empty or a copy this script made (it holds COPY_MARKER): a container
restart keeps its emptyDir, and the copy is made again from the bucket. Every object under the
prefix is copied, each file written aside and renamed into place; a key with an empty, '.' or
'..' segment is refused, so nothing lands outside the destination. Exit 0 when copied, 1 when the
store failed or holds no repository there, 2 for a bad URL or destination.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROG = "kiln fetch"
COPY_MARKER = ".kiln-repository-copy"
"""Written into the destination before the copy ("incomplete") and again once it is complete (the
URL it came from)."""
CONFIG_NAME = "config.pbtxt"
EXIT_STORE, EXIT_USAGE = 1, 2


class FetchError(Exception):
    """The copy cannot be made; the message says why. `exit_code` is the process's status."""

    def __init__(self, message: str, exit_code: int = EXIT_STORE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Copied:
    """What `fetch` copied: files, bytes, models (folders holding a config.pbtxt), seconds."""

    files: int
    size: int
    models: tuple[str, ...]
    seconds: float


def relative_path(key: str, prefix: str) -> Path | None:
    """The destination-relative path of object `key` under `prefix`; None for a folder marker.

    Raises:
        FetchError: the key has an empty, '.' or '..' segment (it could leave the destination).
    """
    relative = key[len(prefix) + 1:] if prefix else key
    if relative.endswith("/"):
        return None
    parts = relative.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise FetchError(f"object key {key!r} has an empty, '.' or '..' segment; refusing to copy it")
    return Path(*parts)


def prepare_destination(destination: Path) -> None:
    """Makes `destination` an empty folder: it must not exist, be empty, or hold an earlier copy.

    Raises:
        FetchError (usage): it is not a folder, or it holds files this script did not put there.
    """
    if destination.exists() and not destination.is_dir():
        raise FetchError(f"destination {destination} exists and is not a folder", EXIT_USAGE)
    if destination.is_dir() and any(destination.iterdir()):
        if not (destination / COPY_MARKER).is_file():
            raise FetchError(
                f"destination {destination} is not empty and holds no earlier copy ({COPY_MARKER}); "
                "give an empty folder (e.g. an emptyDir volume)",
                EXIT_USAGE,
            )
        for child in destination.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    destination.mkdir(parents=True, exist_ok=True)
    # Marks the folder as ours at once, so that a copy that fails half-way is replaced on the next
    # start (a restarted container keeps its emptyDir) instead of being refused as foreign.
    (destination / COPY_MARKER).write_text("incomplete\n")


def fetch(url: str, destination: Path, client: Any = None) -> Copied:
    """Copies every object under the repository URL `url` into `destination`.

    Raises:
        FetchError: a bad URL or destination (exit 2); the store failed, or holds no model
            (no <model>/config.pbtxt) under the prefix (exit 1).
    """
    from kiln.publish_remote import PublishError, describe_storage_error, make_client, parse_location

    try:
        location = parse_location(url)
    except PublishError as error:
        raise FetchError(str(error), EXIT_USAGE) from None
    prepare_destination(destination)
    client = make_client(location.endpoint) if client is None else client
    start = time.monotonic()
    files = size = 0
    models = set()
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=location.bucket, Prefix=location.list_prefix
        )
        for page in pages:
            for item in page.get("Contents", ()):
                relative = relative_path(item["Key"], location.prefix)
                if relative is None:
                    continue
                target = destination / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                partial = target.with_name(f".{target.name}.partial")
                client.download_file(location.bucket, item["Key"], str(partial))
                os.replace(partial, target)
                files += 1
                size += int(item.get("Size", 0))
                if len(relative.parts) == 2 and relative.name == CONFIG_NAME:
                    models.add(relative.parts[0])
    except FetchError:
        raise
    except Exception as error:  # botocore's and boto3's own types, described by kiln publish's words
        raise FetchError(describe_storage_error(error, "copy the repository from", str(location))) from error
    if not models:
        raise FetchError(
            f"no model repository at {location}: no <model>/{CONFIG_NAME} among its {files} object(s) "
            "(publish one with `kiln publish --to URL`)"
        )
    (destination / COPY_MARKER).write_text(url + "\n")
    return Copied(files, size, tuple(sorted(models)), time.monotonic() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Copy a kiln model repository from S3 into a local folder for Triton."
    )
    parser.add_argument("url", help="s3://BUCKET/PREFIX or s3://http(s)://HOST:PORT/BUCKET/PREFIX")
    parser.add_argument("destination", type=Path, help="an empty folder (or an earlier copy)")
    args = parser.parse_args(argv)
    try:
        copied = fetch(args.url, args.destination)
    except FetchError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return error.exit_code
    from kiln.publish_remote import human_bytes

    print(
        f"{PROG}: {args.url} -> {args.destination}: {len(copied.models)} model(s), {copied.files} files "
        f"({human_bytes(copied.size)}) in {copied.seconds:.1f} s",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
