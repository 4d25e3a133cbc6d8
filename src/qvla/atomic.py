"""Write a directory all at once: readers never see a half-written artifact."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_directory(out: str | Path, prefix: str = ".tmp-") -> Iterator[Path]:
    """Yields a fresh directory beside `out`; on success it replaces `out`, on any error it is removed."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; artifacts are meant to be shared
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
