"""A liveness check for a tritonserver in a container: `python -m kiln.server.liveness`.

Triton 2.51's own `/v2/health/live` stays true when a python backend stub dies (the OOM killer,
a segfault in a native library): the model stays READY and every request to it fails with "Stub
process '<instance>' is not healthy", until the server restarts (measured: `kill -9` of fraud's
stub, then four requests over four seconds, all failed, model and server READY). Outside a
container `kiln serve` watches the stubs; in a pod, this check is the liveness probe (the Helm
chart's `exec` probe), so that the kubelet restarts the container instead of leaving it in the
Service, failing its share of the traffic.

It fails (exit 1, the reason on stdout, which the kubelet records in the pod's events) when a stub
of tritonserver died (Triton does not reap them: a dead stub is a zombie child, see
`kiln.server.stubs`), or when `/v2/health/live` does not answer 200; otherwise it exits 0. Exit 2:
it could not find tritonserver (a misconfigured probe, not a dead server).

    python -m kiln.server.liveness [--pid PID] [--url http://127.0.0.1:8000] [--timeout 2]
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from kiln.server.errors import describe_returncode
from kiln.server.stubs import StubWatcher

LIVE_PATH = "/v2/health/live"
DEFAULT_URL = "http://127.0.0.1:8000"
TRITONSERVER = "tritonserver"
ALIVE, DEAD, NOT_FOUND = 0, 1, 2


def find_tritonserver() -> int | None:
    """The pid of the tritonserver process (PID 1 in the image, where the entrypoint execs it),
    or None. With several, the oldest (lowest pid)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0]
        except OSError:
            continue
        if Path(argv0.decode("utf-8", "replace")).name == TRITONSERVER:
            found.append(int(entry.name))
    return min(found) if found else None


def check(pid: int, url: str, timeout: float) -> tuple[int, str]:
    """(exit code, reason) for the tritonserver `pid` serving HTTP at `url`."""
    dead = StubWatcher().crashed(pid)
    if dead:
        # A zombie's argv is gone, so a one-shot check cannot name the model: the pid and how
        # it ended (Triton's log names the instance: "Stub process '<instance>' is not healthy").
        stubs = "; ".join(
            p.describe() if p.model != "?" else f"pid {p.pid}: {describe_returncode(p.returncode or 0)}"
            for p in dead
        )
        return DEAD, (
            f"tritonserver (pid {pid}) has {len(dead)} dead python backend stub(s): {stubs}; their "
            "models stay READY but fail every request until the server restarts"
        )
    try:
        with urllib.request.urlopen(url.rstrip("/") + LIVE_PATH, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (OSError, ValueError) as error:
        return DEAD, f"tritonserver (pid {pid}) does not answer {url}{LIVE_PATH}: {error}"
    if status != 200:
        return DEAD, f"tritonserver (pid {pid}) answers {url}{LIVE_PATH} with HTTP {status}"
    return ALIVE, f"tritonserver (pid {pid}) is live and all its stubs run"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kiln.server.liveness",
        description="Liveness of a tritonserver: its python backend stubs alive and /v2/health/live 200.",
    )
    parser.add_argument("--pid", type=int, help="tritonserver pid (default: the one found)")
    parser.add_argument("--url", default=DEFAULT_URL, help="its HTTP endpoint (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds for the HTTP check")
    args = parser.parse_args(argv)
    pid = args.pid if args.pid is not None else find_tritonserver()
    if pid is None or not Path(f"/proc/{pid}").is_dir():
        print(f"kiln liveness: no tritonserver process found{f' (pid {pid})' if pid else ''}")
        return NOT_FOUND
    code, reason = check(pid, args.url, args.timeout)
    print(f"kiln liveness: {reason}")
    return code


if __name__ == "__main__":
    sys.exit(main())
