"""Image folders and lists, read safely: a relative folder name is resolved inside an allowed root (ComfyUI's
input or output folder) and refused if it, or any image in it, leads outside that root (``..``, absolute
paths, symlinks pointing elsewhere)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import OmniAttributeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class FolderAccessError(OmniAttributeError):
    """A folder or image path is missing, unreadable, empty or outside the folders it may be read from."""


@dataclass(frozen=True)
class ImageFile:
    path: Path          # absolute, symlinks resolved
    name: str           # relative to the listed folder's root (what the index stores), '/'-separated
    size: int
    mtime_ns: int


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_inside(root: str | os.PathLike, relative: str, what: str = "folder") -> Path:
    """``relative`` (a folder or file name below ``root``) → its real path; refused when it is absolute, climbs
    out with '..', or is (or passes through) a symlink that leads outside ``root``."""
    root_real = Path(os.path.realpath(root))
    text = (relative or "").strip().replace("\\", "/")
    if text.startswith("/") or (len(text) > 1 and text[1] == ":"):
        raise FolderAccessError(
            f"{what} {relative!r} is an absolute path: give a {what} relative to {root_real} (e.g. 'gallery')")
    if any(part == ".." for part in text.split("/")):
        raise FolderAccessError(
            f"{what} {relative!r} climbs out with '..': only {what}s inside {root_real} can be read")
    candidate = root_real / text if text else root_real
    real = Path(os.path.realpath(candidate))
    if not _inside(real, root_real):
        raise FolderAccessError(
            f"{what} {relative!r} is a symlink (or passes through one) leading outside {root_real} (to {real}): "
            f"copy the images into {root_real} instead of linking them")
    return real


def list_images(folder: str | os.PathLike, root: str | os.PathLike | None = None, recursive: bool = True
                ) -> list[ImageFile]:
    """The image files of ``folder`` (sorted by name; sub-folders too when ``recursive``). With ``root``, every
    file must lie inside it after resolving symlinks (a link to a file elsewhere is refused, with its name).
    Errors name the folder and what to do: missing, not a folder, unreadable, no images."""
    folder = Path(folder)
    root_real = Path(os.path.realpath(root)) if root is not None else None
    if not folder.exists():
        raise FolderAccessError(f"folder {str(folder)!r} does not exist: create it and put the images there")
    if not folder.is_dir():
        raise FolderAccessError(f"{str(folder)!r} is a file, not a folder: give the folder that holds the images")
    found: list[ImageFile] = []
    escaped: list[str] = []
    base = Path(os.path.realpath(folder))
    stack: list[tuple[Path, str]] = [(base, "")]
    seen = {base}
    while stack:
        current, prefix = stack.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except PermissionError as exc:
            raise FolderAccessError(
                f"cannot read folder {str(current)!r} (permission denied: {exc.strerror}): give the user running "
                "ComfyUI/this command read access, or copy the images to a readable folder") from exc
        except OSError as exc:
            raise FolderAccessError(f"cannot read folder {str(current)!r} ({exc}): check the disk and the path") from exc
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = prefix + entry.name
            real = Path(os.path.realpath(entry.path))
            if root_real is not None and not _inside(real, root_real):
                escaped.append(name)
                continue
            if real.is_dir():
                if recursive and real not in seen:  # a link back up is walked once
                    seen.add(real)
                    stack.append((real, name + "/"))
                continue
            if real.suffix.lower() in IMAGE_SUFFIXES and real.is_file():
                stat = real.stat()
                found.append(ImageFile(real, name, stat.st_size, stat.st_mtime_ns))
    if escaped:
        raise FolderAccessError(
            f"{len(escaped)} entr{'y' if len(escaped) == 1 else 'ies'} of {str(folder)!r} "
            f"({', '.join(escaped[:5])}{', ...' if len(escaped) > 5 else ''}) link outside {root_real}: "
            "only files inside it are read; copy them in instead of linking")
    if not found:
        raise FolderAccessError(
            f"folder {str(folder)!r} holds no images ({' '.join(IMAGE_SUFFIXES)}): put the images to index there")
    found.sort(key=lambda f: f.name)
    return found


def read_image_list(list_file: str | os.PathLike) -> list[ImageFile]:
    """A text file with one image path per line (relative to the file's folder, or absolute; '#' comments)."""
    list_file = Path(list_file)
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise FolderAccessError(f"cannot read the image list {str(list_file)!r}: {exc}") from exc
    found, missing = [], []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        path = Path(text) if Path(text).is_absolute() else list_file.parent / text
        if not path.is_file():
            missing.append(f"line {number}: {text}")
            continue
        real = Path(os.path.realpath(path))
        stat = real.stat()
        found.append(ImageFile(real, text, stat.st_size, stat.st_mtime_ns))
    if missing:
        raise FolderAccessError(f"{len(missing)} image(s) listed in {list_file.name} do not exist "
                                f"({'; '.join(missing[:5])}): fix or remove those lines")
    if not found:
        raise FolderAccessError(f"the image list {str(list_file)!r} names no images: one path per line")
    return found
