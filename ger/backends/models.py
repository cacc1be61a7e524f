"""Model configs (conf/model/<name>.yaml) resolved into a typed ModelSpec.

Every backend reads the model through `resolve_model`, so where the weights live
(a hub id, a local folder, or a tiny model built on the fly for tests) and the
per-prompt media limits are decided in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ger.config import plain


@dataclass(frozen=True)
class ModelSpec:
    """A model config with its weights location resolved."""

    name: str
    path: str  # hub id or local folder the engine loads from
    revision: str | None = None
    tiny: str | None = None  # builder key in ger/testing/tiny_models.py; path is then the built folder
    tiny_version: str | None = None
    supports_video: bool = False  # can take native video input (else frames go in as images)
    max_images: int = 1  # images per prompt (vLLM limit_mm_per_prompt)
    max_videos: int = 0
    max_frames: int = 0  # frames per video
    supports_audio: bool = False  # takes a sound track ({"type": "audio"} parts; Qwen2.5-Omni)
    max_audios: int = 0
    audio_rate: int = 16000  # Hz the sound track is resampled to (the model's audio feature extractor)
    max_model_len: int = 4096
    dtype: str = "auto"
    trust_remote_code: bool = False
    mm_processor_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {max_pixels: ...}
    extra: dict[str, Any] = field(default_factory=dict)  # keys this spec does not know, for backends

    def identity(self) -> dict[str, Any]:
        """What about the model changes an answer (for cache keys).

        `snapshot` is a digest of the weights folder as found on disk (ger/backends/model_identity.py),
        so a changed checkpoint never reuses old answers. A tiny model is named by kind and
        version, not by its folder, so keys do not depend on where the cache lives.
        """
        from ger.backends.model_identity import snapshot_identity

        where = f"tiny:{self.tiny}-{self.tiny_version}" if self.tiny else self.path
        ident = {"model": self.name, "path": where, "revision": self.revision, "dtype": self.dtype}
        ident |= snapshot_identity(self.path, self.revision)
        if self.mm_processor_kwargs:
            ident["mm_processor_kwargs"] = dict(sorted(self.mm_processor_kwargs.items()))
        return ident


def resolve_model(model_cfg: Any, cache_dir: str | Path | None = None) -> ModelSpec:
    """Turn conf/model/<name>.yaml into a ModelSpec; builds the tiny model when `tiny` is set.

    `cache_dir` defaults to $GER_CACHE_DIR or ~/.cache/ger (where tiny models are kept).
    """
    if isinstance(model_cfg, ModelSpec):
        return model_cfg
    cfg = plain(model_cfg)
    known = {f.name for f in fields(ModelSpec)} - {"extra", "tiny_version"}
    values = {k: v for k, v in cfg.items() if k in known}
    values["extra"] = {k: v for k, v in cfg.items() if k not in known}
    values["mm_processor_kwargs"] = dict(values.get("mm_processor_kwargs") or {})
    if not values.get("name"):
        raise ValueError(f"model config needs a 'name'; got keys {sorted(cfg)}")
    tiny = values.get("tiny")
    if tiny:
        from ger.testing.tiny_models import ensure_tiny_model, tiny_version

        root = Path(cache_dir).expanduser() if cache_dir is not None else None
        values["path"] = str(ensure_tiny_model(tiny, root))
        values["tiny_version"] = tiny_version(tiny)
    elif not values.get("path"):
        raise ValueError(f"model {values['name']!r} needs 'path' (hub id or folder) or 'tiny' (a builder)")
    else:
        path = str(values["path"])
        local = Path(path).expanduser()
        values["path"] = str(local.resolve()) if local.exists() else path  # hub ids stay as written
    return ModelSpec(**values)
