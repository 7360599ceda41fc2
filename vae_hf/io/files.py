"""Written files get the permissions a plain write would give them.

safetensors (0.7 and later) and `tempfile.mkstemp` create files readable by their owner only (mode 0600), and the
atomic writes here create a temporary file and rename it over the target; weights and exports then ended up
unreadable to the user's group and others whatever their umask. Every such write ends with `plain_permissions`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PLAIN_FILE_MODE = 0o666
"""What `open(path, "w")` asks for; the umask takes its bits away."""


def current_umask() -> int:
    """The process's umask; Linux reports it in /proc, elsewhere it can only be read by setting it (and back)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def plain_permissions(written: Path, target: Path | None = None) -> Path:
    """Give `written` (a file, or every file below a folder) the mode a plain write would give: the mode of the
    file `target` when `written` is about to replace it, else 0666 minus the umask."""
    written = Path(written)
    mode = PLAIN_FILE_MODE & ~current_umask()
    if target is not None and Path(target).is_file():
        mode = stat.S_IMODE(Path(target).stat().st_mode)  # writing into an existing file keeps its mode
    files = [written] if written.is_file() else [path for path in written.rglob("*") if path.is_file()]
    for path in files:
        os.chmod(path, mode)
    return written
