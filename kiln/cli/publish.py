"""`kiln publish`: upload the generated model repository to object storage for Triton to serve.

    kiln publish --to s3://BUCKET/PREFIX [--repository DIR] [--model NAME ...]
                 [--endpoint-url URL] [--delete] [--dry-run]

The work is `kiln.publish_remote.publish`; this module reads the flags, prints one line per model
and a last line with the --model-repository URL Triton needs, and turns errors into one paragraph
on stderr: exit 2 for bad input (a bad URL, a model folder without config.pbtxt, an unknown
model; nothing written), 1 when the object store refused or could not be reached (the message
names the bucket and the endpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from kiln import paths

EXIT_OK = 0
EXIT_REMOTE_FAILED = 1
EXIT_BAD_INPUT = 2
PROG = "kiln publish"


def add_publish_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Registers `publish` on the `kiln` subparsers; sets `func` to `run_publish`."""
    parser = subparsers.add_parser(
        "publish",
        help="upload the model repository to an S3 bucket that Triton serves from",
        description=(
            "Upload every model folder of the repository (or the named models and every model "
            "they need: a pipeline's steps, the models whose files a step reads) to "
            "s3://BUCKET/PREFIX. Unchanged objects (same size and sha256) are skipped; each "
            "model's config.pbtxt goes up after its files, so a Triton polling the bucket never "
            "sees a config without them. Credentials come from boto3's usual chain "
            "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance role)."
        ),
    )
    parser.add_argument(
        "--to", required=True, metavar="URL",
        help="s3://BUCKET/PREFIX, or s3://http://HOST:PORT/BUCKET/PREFIX for an S3-compatible "
        "server (the form Triton takes); gs:// is not supported yet (use gsutil rsync)",
    )
    parser.add_argument(
        "--repository", type=Path, default=paths.model_repository(), metavar="DIR",
        help="the local model repository (default: %(default)s)",
    )
    parser.add_argument(
        "--model", dest="models", action="append", default=[], metavar="NAME",
        help="publish only this model and the models it needs (repeatable; default: all)",
    )
    parser.add_argument(
        "--endpoint-url", default=None, metavar="URL",
        help="an S3-compatible server, e.g. http://127.0.0.1:9000 (default: the endpoint in "
        "--to, else $AWS_ENDPOINT_URL, else AWS)",
    )
    parser.add_argument(
        "--delete", action="store_true",
        help="also delete objects under the prefix that the local repository no longer has "
        "(with --model: only inside those models' folders); each is listed",
    )
    parser.add_argument(
        "--dry-run", action="store_true",
        help="say what would be uploaded and deleted; write nothing",
    )
    parser.set_defaults(func=run_publish)
    return parser


def run_publish(args: argparse.Namespace) -> int:
    """The `publish` command; returns the exit code."""
    from kiln.publish_remote import (
        PublishError,
        RemoteStorageError,
        environment_endpoint,
        human_bytes,
        parse_location,
        publish,
    )

    try:
        location = parse_location(args.to, args.endpoint_url)
        if location.endpoint is None and environment_endpoint() is not None:
            location = parse_location(args.to, environment_endpoint())
    except PublishError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    repository = Path(args.repository)
    print(f"{PROG}: {repository} -> {location}{' (dry run: nothing is written)' if args.dry_run else ''}",
          flush=True)
    try:
        outcome = publish(
            repository, location, models=args.models or None, delete=args.delete,
            dry_run=args.dry_run, out=sys.stdout,
        )
    except RemoteStorageError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_REMOTE_FAILED
    except PublishError as error:
        print(f"{PROG}: error: nothing was uploaded: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModuleNotFoundError as error:
        if error.name not in ("boto3", "botocore"):
            raise
        print(f"{PROG}: error: needs boto3 ({error.name} is missing): pip install boto3",
              file=sys.stderr)
        return EXIT_BAD_INPUT
    done = outcome.plan
    verb = "to upload" if outcome.dry_run else "uploaded"
    deleted = ""
    if args.delete:
        deleted = f", {len(done.deletions)} {'would be ' if outcome.dry_run else ''}deleted"
    print(
        f"{PROG}: done in {outcome.seconds:.1f} s: {len(done.models)} model(s), {done.uploads} files {verb} "
        f"({human_bytes(done.upload_bytes)}), {done.unchanged} unchanged{deleted}",
    )
    if outcome.readers:
        print(
            f"{PROG}: note: {', '.join(outcome.readers)} read other models' folders when they "
            "load: served from a bucket, they fetch them from it (boto3 and the same credentials "
            "where tritonserver runs; docs/operations.md, \"Model repository in object storage\")",
            flush=True,
        )
    credentials = "" if os.environ.get("AWS_ACCESS_KEY_ID") else " with AWS credentials in its environment"
    print(f"{PROG}: serve it{credentials}: kiln serve --repository {location.triton_url}", flush=True)
    return EXIT_OK
