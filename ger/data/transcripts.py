"""Transcripts: the text a multimodal sample's prompt quotes, from the release's .npy files or .txt.

A .npy transcript may be an object array, which numpy stores as a pickle: it is read with an
unpickler that can build arrays of strings and nothing else, so a data file never runs code.
"""

from __future__ import annotations

import functools
import io
import pickle
from pathlib import Path
from typing import Any

from ger.data.media import MediaError, _require_file

TRANSCRIPT_EXTENSIONS = (".npy", ".txt")


@functools.lru_cache(maxsize=1)
def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only callables an object-array .npy may name: numpy's own array and scalar rebuilders.

    np.save pickles an object array as `_reconstruct(ndarray, ...)` + `dtype(...)` + its items;
    items that are numpy strings add `scalar(dtype, bytes)`. None of these can run other code.
    """
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 moved numpy.core to numpy._core
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # files written by numpy 1 or 2
        allowed[(module, "_reconstruct")] = core.multiarray._reconstruct
        allowed[(module, "scalar")] = core.multiarray.scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = core.numeric._frombuffer
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays of plain Python values and refuses every other global,
    so a crafted transcript cannot call os.system, eval, subprocess or anything else."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _numpy_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}")
        return allowed[(module, name)]


def _read_npy(p: Path) -> Any:
    """np.load without allow_pickle; an object array goes through _ArrayUnpickler instead."""
    import numpy as np

    data = p.read_bytes()
    if not data.startswith(b"\x93NUMPY"):
        return np.load(io.BytesIO(data), allow_pickle=False)  # a .npz archive, or numpy's own error
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    fmt = np.lib.format
    read_header = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    shape, _, dtype = read_header(f)  # parses the header literal safely (ast.literal_eval)
    if not dtype.hasobject:
        return np.load(io.BytesIO(data), allow_pickle=False)
    try:
        arr = _ArrayUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise MediaError(
            f"transcript {p} holds a pickle that is not a plain array of strings ({e}); "
            "ger never runs code from data files: save the transcript as a string array (np.save(path, "
            "np.array(text))) or as a .txt file"
        ) from None
    if not isinstance(arr, np.ndarray) or arr.shape != shape:
        raise MediaError(f"transcript {p}: the pickled data is not the {shape} array its header announces")
    return arr


def _npy_text(p: Path) -> str:
    import numpy as np

    try:
        arr = _read_npy(p)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError(f"cannot read transcript {p}: {e}") from e
    if not isinstance(arr, np.ndarray):
        raise MediaError(f"transcript {p} is an archive, expected one array holding a string")
    items = [arr.item()] if arr.ndim == 0 else arr.reshape(-1).tolist()
    items = [x.decode("utf-8", errors="replace") if isinstance(x, bytes) else x for x in items]
    if not items or not all(isinstance(x, str) for x in items):
        raise MediaError(f"transcript {p} holds {arr.dtype} {arr.shape}, expected a string")
    return " ".join(x.strip() for x in items).strip()


def load_transcript(path: Path | str) -> str:
    """The transcript text of a sample, from a `.npy` (as in the release) or `.txt` file.

    A transcript with no text raises: the prompt would ask about words that are not there.
    """
    p = Path(path)
    if p.suffix.lower() not in TRANSCRIPT_EXTENSIONS:
        raise MediaError(f"unsupported transcript file {p}; expected one of {list(TRANSCRIPT_EXTENSIONS)}")
    _require_file(p, "transcript")
    if p.suffix.lower() == ".npy":
        text = _npy_text(p)
    else:
        try:
            text = p.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise MediaError(f"cannot read transcript {p}: {e}") from e
    if not text:
        raise MediaError(f"transcript is empty (no text, only whitespace): {p}")
    return text
