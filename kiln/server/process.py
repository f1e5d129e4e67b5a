"""One run of the tritonserver binary: launch, stop, and a teardown that leaves nothing behind.

`TritonProcess` assembles a scratch folder (the backend directory), starts tritonserver in its own
process group and session with its output going to a `TritonLog`, stops it (SIGTERM, Triton's
drain, then SIGKILL of the group) and removes what it and its stubs left: the scratch folder and
the python backend's shared-memory regions.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln.server.binary import assemble_backend_directory, triton_environment
from kiln.server.errors import BinaryNotFoundError
from kiln.server.logs import TritonLog
from kiln.server.ports import Ports

MODEL_CONTROL_MODES = ("none", "explicit", "poll")
TRITON_EXIT_TIMEOUT_S = 30
"""Default --exit-timeout-secs (Triton's own default): after SIGTERM, how long Triton waits for
in-flight requests *and for open HTTP client connections* (an idle keep-alive connection counts)
before it exits anyway with status 1."""
STOP_GRACE_S = 10.0
"""Extra time beyond Triton's own drain timeout before the process group is SIGKILLed."""
KILL_WAIT_S = 5.0
"""How long to wait for the process to vanish after SIGKILL."""
SHM_DIR = Path("/dev/shm")
SHM_PREFIX_TEMPLATE = "kiln_triton_{pid}_{token}_"
"""Prefix of the python backend's shared-memory regions, unique per server so that `stop()` can
remove what a killed stub left in /dev/shm."""
SHM_TOKEN_CHARS = 8
PR_SET_PDEATHSIG = 1
"""prctl(2) option: deliver a signal to the child when the parent (thread) dies."""
WORKDIR_PREFIX = "kiln-triton-"
REMOTE_REPOSITORY_SCHEMES = ("s3://", "gs://", "as://")
"""Object stores tritonserver 2.51 reads a model repository from (compiled into the wheel's
libtritonserver): such a repository is passed to --model-repository as written."""


def is_repository_url(repository: object) -> bool:
    """Whether `repository` is an object-storage URL (a str starting with s3://, gs:// or
    as://) rather than a local folder. A Path never is: Path("s3://b") would collapse the '//'."""
    return isinstance(repository, str) and repository.startswith(REMOTE_REPOSITORY_SCHEMES)


def check_model_control(model_control_mode: str, load_models: Sequence[str]) -> None:
    """Raises ValueError for an unknown mode, or models to load outside explicit mode."""
    if model_control_mode not in MODEL_CONTROL_MODES:
        raise ValueError(
            f"model_control_mode must be one of {', '.join(MODEL_CONTROL_MODES)}, "
            f"got {model_control_mode!r}"
        )
    if load_models and model_control_mode != "explicit":
        raise ValueError("load_models needs model_control_mode='explicit'")


@dataclass(frozen=True)
class Options:
    """The tritonserver flags kiln sets (besides the binary's own folders, picked per launch).

    Attributes:
        repository: The model repository: a folder, or an object-storage URL (`is_repository_url`)
            passed through as written.
        host: The interface of every endpoint.
        ports: The HTTP, gRPC and metrics ports (none 0).
        model_control_mode: "none", "explicit" or "poll".
        load_models: --load-model values.
        exit_timeout: --exit-timeout-secs.
        log_verbose: --log-verbose.
        restricted_args: The flags restricting the repository API (see `repository_api`).
        extra_args: Passed through last (Triton takes the last value of a repeated flag).
    """

    repository: Path | str
    host: str
    ports: Ports
    model_control_mode: str
    load_models: tuple[str, ...]
    exit_timeout: int
    log_verbose: int
    restricted_args: tuple[str, ...]
    extra_args: tuple[str, ...]

    def command(self, binary: Path, backend_dir: Path, shm_prefix: str) -> list[str]:
        """tritonserver's command line."""
        repository = self.repository if isinstance(self.repository, str) else self.repository.resolve()
        command = [
            str(binary),
            f"--model-repository={repository}",
            f"--backend-directory={backend_dir}",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            f"--model-control-mode={self.model_control_mode}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-port={self.ports.metrics}",
            f"--exit-timeout-secs={self.exit_timeout}",
            f"--log-verbose={self.log_verbose}",
        ]
        command += [f"--load-model={name}" for name in self.load_models]
        command += self.restricted_args
        command += self.extra_args
        return command


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGTERM tritonserver if kiln dies without stopping it.

    The kernel sends it when the *thread* that started the child exits, so it is only safe from
    the main thread; elsewhere (and off Linux) None.
    """
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork
    except (OSError, AttributeError):
        return None

    def preexec() -> None:  # runs in the child between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return preexec


class TritonProcess:
    """One launch of tritonserver; `cleanup()` runs once and leaves no process or file behind.

    Args:
        log: Where tritonserver's output goes (opened by `launch`, closed by `cleanup`).
    """

    def __init__(self, log: TritonLog) -> None:
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self._workdir: Path | None = None
        self._shm_prefix: str | None = None
        self._cleaned = False

    @property
    def pid(self) -> int | None:
        """tritonserver's process id (also its process group id); None until it was started."""
        return self.popen.pid if self.popen is not None else None

    def poll(self) -> int | None:
        """Its exit status; None while it runs or before it started."""
        return self.popen.poll() if self.popen is not None else None

    def launch(
        self,
        binary: Path,
        triton_root: Path,
        backends: tuple[Path, Sequence[str]],
        options: Options,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Assembles the backend directory, opens the log, starts tritonserver, follows its output.

        Args:
            binary: The tritonserver binary.
            triton_root: The folder holding its python backend and stubs.
            backends: The folder of kiln's backends and the names of those to copy.
            options: Its flags.
            env: Variables set for tritonserver (and its stubs) over kiln's own environment
                (`triton_environment`), e.g. the AWS_* credentials of an s3:// repository.

        Raises:
            BinaryNotFoundError: the binary could not be run, or this Python has no stub.
        """
        self._workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        backend_dir = self._workdir / "backends"
        assemble_backend_directory(backend_dir, triton_root, *backends)
        self.log.open()
        self._shm_prefix = SHM_PREFIX_TEMPLATE.format(
            pid=os.getpid(), token=uuid.uuid4().hex[:SHM_TOKEN_CHARS]
        )
        command = options.command(binary, backend_dir, self._shm_prefix)
        try:
            self.popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**triton_environment(triton_root), **(env or {})},
                # Own session: a terminal's Ctrl-C reaches kiln only, which then stops Triton.
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec(),
            )
        except OSError as error:
            raise BinaryNotFoundError(f"cannot run tritonserver at {binary}: {error}") from error
        assert self.popen.stdout is not None
        self.log.follow(self.popen.stdout, f"tritonserver-log-{self.popen.pid}")

    def stop(self, wait_s: float) -> None:
        """SIGTERM, then waits `wait_s` for Triton's drain; SIGKILLs the group after that, or at
        once on a Ctrl-C (which is re-raised). Does not clean up."""
        assert self.popen is not None
        self.stopping = True
        if self.popen.poll() is not None:
            return
        try:
            self.popen.send_signal(signal.SIGTERM)
            self.popen.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            self.kill_group()
        except KeyboardInterrupt:
            self.kill_group()
            raise

    def kill_group(self) -> None:
        """SIGKILLs tritonserver's process group and waits briefly for it to vanish."""
        assert self.popen is not None
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.popen.wait(timeout=KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            pass

    def cleanup(self) -> None:
        """Kills whatever is left of the process group and removes temp files and shm regions.

        Runs once per launch: the group id is only signalled while it can still be ours.
        """
        if self._cleaned:
            return
        self._cleaned = True
        process = self.popen
        if process is not None:
            if process.poll() is None:
                self.kill_group()
            # Stubs whose tritonserver died may outlive it briefly; they share its process group.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.log.drain()
            if process.stdout is not None:
                process.stdout.close()
        self.log.close()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        if self._shm_prefix is not None and SHM_DIR.is_dir():
            for region in SHM_DIR.glob(f"{self._shm_prefix}*"):
                try:
                    region.unlink()
                except OSError:
                    pass
