"""Which file names count as images, shared by every image source.

Kept apart from the sources so folder, list and archive sources agree on one rule.
"""

from __future__ import annotations

from pathlib import PurePosixPath

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")

# Folders that archivers add and that never hold real training images.
_JUNK_DIRS = frozenset({"__MACOSX"})


def has_image_extension(name: str) -> bool:
    """True when ``name`` ends with one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_hidden_or_junk(relative_name: str) -> bool:
    """True when any part of a relative path is hidden (``.name``) or an archiver folder.

    Hidden files are editor/OS droppings (``.DS_Store``, ``._photo.jpg`` resource forks)
    that often carry an image extension but are not images.
    """
    for part in PurePosixPath(relative_name).parts:
        if part in (".", ""):
            continue
        if part.startswith(".") or part in _JUNK_DIRS:
            return True
    return False


def is_image_member(relative_name: str) -> bool:
    """True when a folder entry or archive member should be listed as an image."""
    return has_image_extension(relative_name) and not is_hidden_or_junk(relative_name)
