"""What ``evaluate.py --images`` reads: globs over symlink loops (each real file once, quickly), glob semantics
kept, and a directory that is not searched recursively saying how to do that."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Callable

import pytest

from cityseg.errors import DataError
from cityseg.eval_job import image_files


def _touch(root: Path, *names: str) -> list[Path]:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")  # image_files lists files; nothing reads them
    return [root / n for n in names]


def _within(seconds: float, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, failing when it has not returned within ``seconds`` (a walk that explodes goes on in a
    daemon thread, not in the test)."""
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(fn(*args))
        except Exception as e:  # raised below, in the test's own thread
            result.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"{fn.__name__}{args} still running after {seconds} s"
    if isinstance(result[0], Exception):
        raise result[0]
    return result[0]


REAL = ("1.png", "2.png", "3.jpg", "a/1.png", "a/2.png", "a/b/deep.png", "c/x.bmp", "c/y.PNG")


@pytest.mark.quick
def test_a_glob_over_symlink_loops_finds_each_real_file_once(tmp_path):
    photos = tmp_path / "photos"
    real = _touch(photos, *REAL)
    _touch(photos, ".hidden.png", ".cache/skip.png", "a/notes.txt")  # hidden names: not matched by * or **
    os.symlink("..", photos / "a" / "b" / "up")  # one loop: a/b/up is a
    os.symlink("1.png", photos / "same.png")  # another name for a real file
    files, base = image_files(f"{photos}/**/*")
    assert (files, base) == (sorted(real), photos)
    os.symlink("../..", photos / "a" / "b" / "top")  # a second loop: a/b/top is photos; glob's walk explodes
    os.symlink("../a", photos / "c" / "to_a")
    for pattern in (f"{photos}/**/*", f"{photos}/**", f"{photos}/**/*.*", f"{photos}/**/**/*"):
        assert _within(5, image_files, pattern) == (sorted(real), photos), pattern
    assert image_files(f"{photos}/**/*.png")[0] == sorted(p for p in real if p.suffix == ".png")  # case-sensitive
    # the usual glob syntax keeps its meaning
    assert image_files(f"{photos}/a/[2-9].png")[0] == [photos / "a" / "2.png"]
    assert image_files(f"{photos}/?/*")[0] == [photos / "a" / "1.png", photos / "a" / "2.png", photos / "c" / "x.bmp",
                                               photos / "c" / "y.PNG"]
    assert image_files(f"{photos}/**/b/*.png")[0] == [photos / "a" / "b" / "deep.png"]
    assert image_files(f"{photos}/.cache/**/*")[0] == [photos / ".cache" / "skip.png"]  # named: found


def test_a_directory_is_read_without_its_subfolders_and_says_how_to_recurse(tmp_path):
    photos = tmp_path / "photos"
    _touch(photos, "front/1.png", "rear/2.jpg")
    with pytest.raises(DataError) as e:
        image_files(str(photos))
    assert str(e.value) == (f"--images {photos}: no images in the directory itself, only in its subfolders (a "
                            f"directory is not searched recursively); pass --images '{photos}/**/*'.")
    assert image_files(f"{photos}/**/*") == ([photos / "front" / "1.png", photos / "rear" / "2.jpg"], photos)
    top = _touch(photos, "0.png")
    os.symlink("0.png", photos / "again.png")
    assert image_files(str(photos)) == (top, photos)  # its own files only, each real one once
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no \.png/\.jpg/\.jpeg/\.bmp images found; pass a directory or a glob\.$"):
        image_files(str(empty))
