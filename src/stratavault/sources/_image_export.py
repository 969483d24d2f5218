"""Disk image files (qcow2, raw, vmdk, vhdx, vdi) served read-only over NBD.

A private qemu-storage-daemon opens the image and is driven over QMP with the
same code as a running VM (:class:`ExportSession`, without fleecing: nothing
else writes to a stopped image), so a qcow2 with a persistent bitmap chain
still gets an incremental, and gets its bitmaps rotated the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
from pathlib import Path
from types import TracebackType

from stratavault._defaults import IMAGE_FORMATS
from stratavault.errors import SourceError
from stratavault.sources._bitmap_chain import DEFAULT_BITMAP_PREFIX
from stratavault.sources._export import DiskExport, ExportSession
from stratavault.sources._qmp import QmpSession
from stratavault.sources._raw_disk import probe_image_format
from stratavault.sources._vm import disk_by_node

__all__ = ["IMAGE_FORMATS", "ImageExport", "ImageServer"]


_NODE = "disk"
_START_TIMEOUT_S = 10.0


class ImageExport:
    """A disk image exported read-only over NBD for the time of a ``with`` block.

    A qcow2 opened with ``track_changes`` (the default) is opened read-write so its
    bitmap chain rotates as for a live VM (``expected_bitmap`` as recorded by the
    parent snapshot; see :attr:`DiskExport.new_bitmap`); on failure the frozen
    bitmap is merged back. Other formats, a qcow2 that cannot be written (read-only
    storage), or ``track_changes=False``, are opened read-only and always read in
    full. The image must not be in use by a VM.
    """

    def __init__(
        self,
        image: str | os.PathLike[str],
        scratch_dir: str | os.PathLike[str],
        *,
        fmt: str | None = None,
        track_changes: bool = True,
        expected_bitmap: str | None = None,
        bitmap_prefix: str = DEFAULT_BITMAP_PREFIX,
    ) -> None:
        self.image = Path(image).absolute()
        self.scratch_dir = Path(scratch_dir)
        self.fmt = fmt
        self.track_changes = track_changes
        self.expected_bitmap = expected_bitmap
        self.bitmap_prefix = bitmap_prefix
        self._process: subprocess.Popen[bytes] | None = None
        self._session: QmpSession | None = None
        self._export: ExportSession | None = None
        self.export: DiskExport | None = None
        """The served disk (set inside the ``with`` block)."""

    def __enter__(self) -> ImageExport:
        fmt = self._prepare("exporting")
        # A qcow2 on read-only storage (a snapshot, a read-only mount) is read in full.
        writable = self.track_changes and fmt == "qcow2" and os.access(self.image, os.W_OK)
        try:
            self._session = self._start_daemon(fmt, writable)
            disk = disk_by_node(self._session, _NODE)
            if not writable:
                disk = dataclasses.replace(disk, read_only=True)
            expected = {_NODE: self.expected_bitmap} if self.expected_bitmap else {}
            export = ExportSession(
                self._session, [disk], self.scratch_dir,
                expected_bitmaps=expected, bitmap_prefix=self.bitmap_prefix, fleece=False,
            )  # fmt: skip
            export.start()
        except BaseException:
            self._stop_daemon()
            raise
        self._export = export
        self.export = export.exports[0]
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        export, self._export = self._export, None
        errors = export.release(success=exc is None) if export else []
        errors += self._stop_daemon()
        if not errors:
            return
        if exc is not None:
            for error in errors:
                exc.add_note(f"also during teardown: {error}")
            return
        raise SourceError(f"tearing down the export of {self.image} - " + "; ".join(errors))

    def _prepare(self, doing: str) -> str:
        """The image's format (probed unless given), checked; the scratch folder made."""
        fmt = self.fmt or probe_image_format(self.image)
        if fmt not in IMAGE_FORMATS:
            raise SourceError(f"{doing} the image {self.image} - unsupported format {fmt!r}")
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        return fmt

    def _start_daemon(self, fmt: str, writable: bool) -> QmpSession:
        ro = not writable
        file_node = {"driver": "file", "node-name": "file", "filename": os.fspath(self.image),
                     "read-only": ro}  # fmt: skip
        fmt_node = {"driver": fmt, "node-name": _NODE, "file": "file", "read-only": ro}
        # The monitor is one end of a socket pair: its greeting comes as soon as the
        # daemon is up, with no socket file to wait for and connect to.
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [
            "qemu-storage-daemon",
            "--blockdev", json.dumps(file_node), "--blockdev", json.dumps(fmt_node),
            "--chardev", f"socket,id=qmp0,fd={theirs.fileno()}", "--monitor", "chardev=qmp0",
        ]  # fmt: skip
        try:
            self._process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            label = Path(f"qemu-storage-daemon for {self.image}")
            return QmpSession(label, timeout_s=30.0, connected=ours)
        except SourceError as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=_START_TIMEOUT_S)
            if self._process.returncode is None:
                raise SourceError(f"opening the image {self.image} - {exc}") from exc
            raise SourceError(f"opening the image {self.image} - {self._exit_reason()}") from exc

    def _exit_reason(self) -> str:
        """What the daemon, which has ended, said on stderr (else its exit status)."""
        assert self._process is not None and self._process.stderr is not None
        stderr = self._process.stderr.read().decode(errors="replace").strip()
        return stderr or f"qemu-storage-daemon exited with status {self._process.returncode}"

    def _stop_daemon(self) -> list[str]:
        """Quit the daemon cleanly (so bitmaps are stored); kill it if it hangs."""
        errors: list[str] = []
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(SourceError):  # it may hang up before answering
                session.execute("quit", timeout_s=5)
            session.close()
        process, self._process = self._process, None
        if process is not None:
            try:
                process.wait(timeout=10 if session is not None else 0.1)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                if session is not None:
                    errors.append(f"qemu-storage-daemon for {self.image} did not quit; killed")
            if process.stderr is not None:
                process.stderr.close()
        return errors


class ImageServer(ImageExport):
    """A disk image served *writable* over NBD for the time of a ``with`` block (to restore
    onto it), with its dirty bitmap ``bitmap`` exported when that bitmap is usable: then
    :attr:`bitmap_context` lists what changed since the backup that created it."""

    def __init__(
        self,
        image: str | os.PathLike[str],
        scratch_dir: str | os.PathLike[str],
        *,
        fmt: str | None = None,
        bitmap: str | None = None,
    ) -> None:
        super().__init__(image, scratch_dir, fmt=fmt, track_changes=False)
        self.bitmap = bitmap
        self.uri = ""
        self.bitmap_context: str | None = None
        self.bitmap_problem: str | None = None
        """Why the bitmap cannot be used (absent, inconsistent, not recording)."""

    def __enter__(self) -> ImageServer:
        fmt = self._prepare("serving")
        socket_path = self.scratch_dir / "serve.sock"
        try:
            self._session = self._start_daemon(fmt, True)
            export: dict[str, object] = {
                "type": "nbd", "id": "serve", "node-name": _NODE, "name": "disk",
                "writable": True,
            }  # fmt: skip
            if self.bitmap:
                found = {b.name: b for b in disk_by_node(self._session, _NODE).bitmaps}
                bitmap = found.get(self.bitmap)
                if bitmap is None:
                    self.bitmap_problem = f"the image has no bitmap {self.bitmap}"
                elif bitmap.inconsistent or not bitmap.recording:
                    self.bitmap_problem = f"bitmap {self.bitmap} is inconsistent or disabled"
                else:
                    export["bitmaps"] = [self.bitmap]
                    self.bitmap_context = f"qemu:dirty-bitmap:{self.bitmap}"
            addr = {"type": "unix", "data": {"path": os.fspath(socket_path)}}
            self._session.execute("nbd-server-start", {"addr": addr})
            self._session.execute("block-export-add", export)
        except BaseException:
            self._stop_daemon()
            raise
        self.uri = f"nbd+unix:///disk?socket={socket_path}"
        return self
