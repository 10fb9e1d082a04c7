"""The one dependency check done at import: megatron-core present and new enough."""

from __future__ import annotations

from importlib import metadata

MIN_MEGATRON_CORE = (0, 16, 1)


def _parse(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_megatron_core(installed: str | None = None) -> None:
    """Raise ``ImportError`` naming the fix when megatron-core is missing or older than 0.16.1."""
    wanted = ".".join(map(str, MIN_MEGATRON_CORE))
    if installed is None:
        try:
            installed = metadata.version("megatron-core")
        except metadata.PackageNotFoundError:
            raise ImportError(
                f"lightning_megatron needs megatron-core >= {wanted}, which is not installed; "
                f"run: pip install 'megatron-core>={wanted}'"
            ) from None
    if _parse(installed) < MIN_MEGATRON_CORE:
        raise ImportError(
            f"megatron-core {installed} is too old; lightning_megatron needs >= {wanted}: "
            f"pip install -U 'megatron-core>={wanted}'"
        )
