"""The python backend's stub processes of a tritonserver, watched through /proc.

Triton 2.51 neither restarts a stub that died (killed by the OOM killer, say) nor stops
reporting its model READY, and it does not reap it: a dead stub shows as a zombie child of
tritonserver. `StubWatcher` lists the stubs, remembering which model each serves while it is
alive, so that a dead one can still be named.
"""

from __future__ import annotations

from pathlib import Path

from kiln.server.binary import STUB_NAME
from kiln.server.errors import ZOMBIE, BackendProcess

STUB_ARG_MODEL_FILE = 1
"""argv index of the stub's model file, `<repository>/<model>/<version>/model.py`."""
STUB_ARG_INSTANCE = 8
"""argv index of the stub's model instance name (e.g. `fraud_features_0_0`)."""
PROC_STAT_EXIT_CODE = 49
"""Index of `exit_code` (field 52 of proc(5), a waitpid status) after the `(comm)` field."""
WAIT_SIGNAL_MASK = 0x7F
WAIT_EXIT_SHIFT = 8
WAIT_EXIT_MASK = 0xFF


def _wait_status_to_returncode(status: int) -> int:
    """A waitpid(2) status as a Popen returncode: -signal, or the exit code."""
    signal_number = status & WAIT_SIGNAL_MASK
    return -signal_number if signal_number else (status >> WAIT_EXIT_SHIFT) & WAIT_EXIT_MASK


def _proc_children(parent: int) -> list[tuple[int, str, int | None, list[str]]]:
    """(pid, state, returncode of a zombie, argv) of each child process of `parent`, from /proc."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[1]) != parent:
                continue
            argv = (entry / "cmdline").read_bytes().decode("utf-8", "replace").split("\0")
        except (OSError, ValueError, IndexError):  # exited meanwhile
            continue
        state = fields[0]
        returncode = None
        if state == ZOMBIE and len(fields) > PROC_STAT_EXIT_CODE:
            returncode = _wait_status_to_returncode(int(fields[PROC_STAT_EXIT_CODE]))
        children.append((int(entry.name), state, returncode, argv))
    return children


class StubWatcher:
    """The stubs of one tritonserver; remembers which model each stub it saw alive serves."""

    def __init__(self) -> None:
        self._known: dict[int, BackendProcess] = {}

    def clear(self) -> None:
        """Forgets the stubs of a failed launch, before a retry."""
        self._known.clear()

    def processes(self, parent: int) -> list[BackendProcess]:
        """The stub processes among the children of `parent` (tritonserver), alive or dead (not
        reaped), by pid; a dead one kiln never saw alive has model "?"."""
        found = []
        for pid, state, returncode, argv in _proc_children(parent):
            known = self._known.get(pid)
            if len(argv) > STUB_ARG_INSTANCE and Path(argv[0]).name == STUB_NAME:
                model_file = Path(argv[STUB_ARG_MODEL_FILE])
                known = BackendProcess(
                    pid, model_file.parent.parent.name, model_file.parent.name,
                    argv[STUB_ARG_INSTANCE], state, returncode,
                )
                self._known[pid] = known
            elif known is None:
                if state != ZOMBIE:
                    continue  # not a stub (nothing else is started by tritonserver here)
                known = BackendProcess(pid, "?", "?", "?", state, returncode)
            found.append(known._replace(state=state, returncode=returncode))
        return sorted(found, key=lambda p: p.pid)

    def crashed(self, parent: int) -> list[BackendProcess]:
        """Stubs of `parent` that died on their own (killed, or exited non-zero). Triton reaps
        the stubs it stops itself (unload), so those are not listed."""
        return [p for p in self.processes(parent) if not p.alive and p.returncode != 0]
