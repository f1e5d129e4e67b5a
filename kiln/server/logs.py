"""Triton's log: read from its stdout, kept (memory, file, stream) and scanned for failures.

`TritonLog` keeps the last LOG_MEMORY_LINES lines for error reports, writes every line to the log
file and optionally to a stream, and extracts what explains a failed start: a model's own load
error (without the Python traceback the stub appends) and a port Triton could not bind.
"""

from __future__ import annotations

import collections
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import IO, TextIO

from kiln.server.errors import ModelLoadFailedError, PortInUseError, TritonServerError

LOG_READER_JOIN_S = 2.0
"""How long to wait for the log reader to drain the pipe after Triton exited."""
LOG_MEMORY_LINES = 5000
"""Log lines kept in memory for error reports (the log file keeps everything)."""
ERROR_TAIL_LINES = 15
"""Log lines quoted in an error about Triton exiting or never becoming ready."""
LOG_FILE_PREFIX = "kiln-tritonserver-"
LOG_FILE_SUFFIX = ".log"

# --- Triton log formats (tritonserver 2.51.0) ------------------------------------------------
# A log line: `E1122 11:31:14.120514 4688 model_lifecycle.cc:642] "message"`, where the message
# is a quoted string with C escapes (\n, \"). Tables (the model status table) are printed raw.
_LOG_LINE = re.compile(r"^\S.*? [\w.-]+:\d+\] ?(?P<message>.*)$")
"""Lenient about the prefix (severity, time, thread), so --log-format=ISO8601 parses too."""
_MODEL_FAILED = re.compile(r"^failed to load '(?P<model>[^']+)' version \d+: (?P<error>.*)$", re.S)
_MODEL_POLL_FAILED = re.compile(
    r"^Poll failed for model directory '(?P<model>[^']+)': (?P<error>.*)$", re.S
)
_MODEL_LOADED = re.compile(r"^successfully loaded '(?P<model>[^']+)'")
_PORT_FAILED = re.compile(
    r"failed to start (?P<service>HTTP|GRPC|Metrics) service: .*?"
    r"Socket '(?P<host>.*):(?P<port>\d+)' already in use",
    re.I,
)
_PROTOBUF_ERROR = re.compile(r"^\[libprotobuf ERROR [^\]]*\] (?P<error>.*)$")
_STATUS_ROW = re.compile(
    r"^\|\s*(?P<model>[^|\s][^|]*?)\s*\|\s*\d+\s*\|\s*UNAVAILABLE: (?P<error>.*?)\s*\|$"
)
_TABLE_CHARS = "|+"
"""First characters of the rows of the tables Triton prints (models, backends, options)."""
_TRACEBACK_MARK = "\n\nAt:\n"
"""The python backend appends the Python traceback after this to a failed `initialize`."""


def _unquote(message: str) -> str:
    """Undoes the quoting Triton applies to a log message (`"...\\n..."`)."""
    if len(message) >= 2 and message[0] == '"' and message.endswith('"'):
        try:
            return json.loads(message)
        except ValueError:
            body = message[1:-1]
            return body.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
    return message


def clean_model_error(error: str) -> str:
    """Triton's message for a failed model, without the Python traceback the stub appends."""
    return error.split(_TRACEBACK_MARK, 1)[0].strip()


class TritonLog:
    """The log of one TritonServer, over all its launches (a retried start overwrites the file).

    Args:
        path: Where the full log is saved; None: a new file in the temp folder at `open()`.
        stream: A text stream receiving each line as it arrives; set to None when it breaks.
    """

    def __init__(self, path: Path | None, stream: TextIO | None) -> None:
        self.path = path
        self.stream = stream
        self._handle: IO[str] | None = None
        self._reader: threading.Thread | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=LOG_MEMORY_LINES)
        self._lock = threading.Lock()
        self._model_errors: dict[str, str] = {}
        self._port_failures: list[tuple[str, str, int]] = []
        self._last_protobuf_error: str | None = None

    # --- the file and the reader ---

    def open(self) -> None:
        """Creates (or truncates) the log file; picks a temp file when no path was given."""
        if self.path is None:
            handle, name = tempfile.mkstemp(prefix=LOG_FILE_PREFIX, suffix=LOG_FILE_SUFFIX)
            os.close(handle)
            self.path = Path(name)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "w", encoding="utf-8")  # noqa: SIM115

    def follow(self, pipe: IO[bytes], name: str) -> None:
        """Reads `pipe` (tritonserver's stdout and stderr) line by line in a daemon thread."""
        self._reader = threading.Thread(target=self._read, args=(pipe,), name=name, daemon=True)
        self._reader.start()

    def drain(self) -> None:
        """Lets the reader consume what Triton wrote before it exited."""
        if self._reader is not None:
            self._reader.join(timeout=LOG_READER_JOIN_S)

    def close(self) -> None:
        """Closes the log file (lines read later still reach memory and the stream)."""
        with self._lock:
            if self._handle is not None:
                self._handle.close()
                self._handle = None

    def reset(self) -> None:
        """Forgets the lines and failures of a failed launch, before a retry."""
        with self._lock:
            self._lines.clear()
            self._model_errors.clear()
            self._port_failures.clear()

    def _read(self, pipe: IO[bytes]) -> None:
        try:
            for raw in iter(pipe.readline, b""):
                self.record(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        except (OSError, ValueError):  # the pipe was closed by cleanup after a join timeout
            pass

    # --- lines ---

    def record(self, line: str) -> None:
        """Keeps one log line: memory, file, stream, and the failure scan."""
        with self._lock:
            self._lines.append(line)
            self._scan(line)
            if self._handle is not None and not self._handle.closed:
                self._handle.write(line + "\n")
                self._handle.flush()
        if self.stream is not None:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # closed or broken stream: keep the file log
                self.stream = None

    def text(self) -> str:
        """The last LOG_MEMORY_LINES lines (the log file keeps all)."""
        with self._lock:
            return "".join(line + "\n" for line in self._lines)

    def tail(self, lines: int = ERROR_TAIL_LINES) -> list[str]:
        """The last `lines` log lines worth quoting in an error: not empty, not table rows."""
        with self._lock:
            kept = [line for line in self._lines if line.strip() and line[0] not in _TABLE_CHARS]
        return kept[-lines:]

    # --- the failure scan ---

    @property
    def model_errors(self) -> dict[str, str]:
        """Model -> load error extracted from the log so far."""
        with self._lock:
            return dict(self._model_errors)

    def failure(self) -> TritonServerError | None:
        """The error the log explains, if any: a port taken, else models that failed to load."""
        with self._lock:
            port_failures = list(self._port_failures)
            model_errors = dict(self._model_errors)
        if port_failures:
            protocol, host, port = port_failures[0]
            return PortInUseError(port, protocol, host, log_path=self.path)
        if model_errors:
            return ModelLoadFailedError(model_errors, log_path=self.path)
        return None

    def _scan(self, line: str) -> None:
        """Records model load failures and port bind failures from one log line."""
        protobuf = _PROTOBUF_ERROR.match(line)
        if protobuf:
            self._last_protobuf_error = protobuf.group("error").strip()
            return
        status = _STATUS_ROW.match(line)
        if status:  # the model status table: a fallback for failures logged in another form
            self._model_errors.setdefault(status.group("model"), status.group("error"))
            return
        match = _LOG_LINE.match(line)
        if not match:
            return
        message = _unquote(match.group("message").strip())
        if failed := _MODEL_FAILED.match(message):
            self._model_errors[failed.group("model")] = clean_model_error(failed.group("error"))
        elif failed := _MODEL_POLL_FAILED.match(message):
            error = clean_model_error(failed.group("error"))
            if self._last_protobuf_error:
                error = f"{error}: {self._last_protobuf_error}"
            self._model_errors[failed.group("model")] = error
        elif loaded := _MODEL_LOADED.match(message):
            self._model_errors.pop(loaded.group("model"), None)
        elif port := _PORT_FAILED.search(message):
            self._port_failures.append(
                (port.group("service").lower(), port.group("host"), int(port.group("port")))
            )
        self._last_protobuf_error = None  # it only explains the line right after it
