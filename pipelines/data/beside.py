"""Write a folder beside its place, then rename it into place: `cdm prepare` and `cdm sample` use it.

A command stopped while writing (Ctrl-C, SIGTERM, a full disk, SIGKILL) must leave the folder the user
named as it was: the old dataset intact, or no folder at all, never a half-written or empty one. The
new folder is written as `.NAME.partial-PID` beside `NAME`; the old one, if any, is moved aside as
`.NAME.old-PID` for the instant between the two renames. `recover_leftovers` cleans what a killed
process left (a partial is dropped, an old folder without its NAME is put back).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipelines.common import storage
from pipelines.common.console import warn
from pipelines.common.errors import UserError

# The longest name cdm gives a file beside --out, `.NAME.partial-PID`, must fit a file name's 255 bytes
# (PIDs go up to 2**22, 7 digits); a longer NAME is cut and made unique again by a hash of it.
_NAME_MAX = 255
_LONGEST_SUFFIX = len(".partial-4194304")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def sibling(target: Path, kind: str, pid: int | str | None = None) -> Path:
    """`.NAME.KIND-PID` (or `.NAME.KIND` without a pid) beside `target`, within 255 bytes whatever NAME's length."""
    prefix = f".{target.name}"
    room = _NAME_MAX - _LONGEST_SUFFIX
    if len(prefix.encode()) > room:
        digest = hashlib.sha256(target.name.encode()).hexdigest()[:16]
        prefix = prefix.encode()[: room - len(digest) - 1].decode(errors="ignore") + "~" + digest
    return target.with_name(f"{prefix}.{kind}" + (f"-{pid}" if pid is not None else ""))


def recover_leftovers(target: Path, command: str) -> None:
    """What a killed `written_beside` on this machine left beside `target`: put the old folder back, drop the new.

    Killed between its two renames, a run leaves the old folder as `.<name>.old-<pid>` and no `<name>`;
    killed while writing, a `.<name>.partial-<pid>`. Folders of a process still running are left alone.
    """
    if not target.parent.is_dir():
        return
    names = sorted(os.listdir(target.parent))
    for kind in ("old", "partial"):
        start = sibling(target, kind, "").name  # `.NAME.KIND-`
        for name in names:
            pid = name[len(start) :]
            if not name.startswith(start) or not pid.isdigit() or alive(int(pid)):
                continue
            leftover = target.parent / name
            if kind == "old" and not target.exists():
                os.replace(leftover, target)
                warn(f"warning: {target}: put back the folder an interrupted `{command}` had moved aside")
            else:
                shutil.rmtree(leftover, ignore_errors=True)


@contextlib.contextmanager
def written_beside(target: Path, uri: str, what: str) -> Iterator[Path]:
    """A fresh `.NAME.partial-PID` folder for the block to write; when the block ends well it replaces `target`.

    An exception (KeyboardInterrupt included) leaves `target` as it was and removes the partial folder;
    a full disk is one line naming `uri` (`what`: the thing written, for that line).
    """
    partial = sibling(target, "partial", os.getpid())
    shutil.rmtree(partial, ignore_errors=True)
    try:
        partial.mkdir(parents=True)
        yield partial
        # The paths inside dataset.json are names relative to the folder, so the folder may move.
        if target.exists():
            old = sibling(target, "old", os.getpid())
            os.replace(target, old)
            os.replace(partial, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, target)
    except (storage.NoSpace, OSError) as err:
        if isinstance(err, OSError) and err.errno not in storage.FULL:
            raise
        reason = err.reason if isinstance(err, storage.NoSpace) else os.strerror(err.errno)
        raise UserError(
            f"{uri}: {reason} while writing the new {what} beside it; free space on that disk (or raise the "
            "quota or file-size limit) or choose another --out. Nothing at --out changed"
        ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
