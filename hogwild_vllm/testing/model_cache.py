"""The folder cache shared by the project's local models (tiny ones and converted real ones).

A model folder is ``<cache>/<name>-<hash>``; it counts as present when it holds ``config.json``. A build runs in a
temporary folder beside it (``.<final name>.XXXX``) under a file lock (``<final>.lock``) and is renamed into place,
so a reader never sees half a model and two processes building the same folder build it once.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable

CACHE_ENV = "HOGWILD_MODEL_CACHE"


def default_cache_dir() -> pathlib.Path:
    """``$HOGWILD_MODEL_CACHE``, else ``~/.cache/hogwild_vllm/models``."""
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "hogwild_vllm" / "models"


def cached_folder(final: pathlib.Path, build: Callable[[pathlib.Path], None], what: str,
                  log: Callable[[str], None]) -> pathlib.Path:
    """Return ``final``, first calling ``build(tmp)`` to fill a temporary folder that then becomes ``final``.

    ``what`` names the model in the two progress lines given to ``log`` (start, and the time it took).
    """
    if (final / "config.json").is_file():
        return final
    from filelock import FileLock

    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final) + ".lock"):
        if (final / "config.json").is_file():  # another process built it meanwhile
            return final
        # Holding the lock, anything else of this name is debris of a killed build.
        for stale in [final, *root.glob(f".{final.name}.*")]:
            shutil.rmtree(stale, ignore_errors=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
        try:
            t0 = time.time()
            log(f"building {what} into {final}")
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp made it private (and transformers writes safetensors files as 0600)
            for f in tmp.rglob("*"):
                f.chmod(0o755 if f.is_dir() else 0o644)
            os.rename(tmp, final)
            log(f"built {what} in {time.time() - t0:.1f}s")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
