"""HTTPS for the router: the server's SSLContext from PEM files, re-read when the files change.

cert-manager renews a certificate in place (Kubernetes swaps a Secret volume's files atomically).
`CertReloader.run` stats the two files every `interval_s` and, when they changed, loads them into
the SAME SSLContext with `load_cert_chain`: new connections get the new certificate, open ones keep
theirs. A load that fails half-way leaves an SSLContext unusable (OpenSSL installs the certificate
before it checks the key: every handshake then fails), so a new pair is first loaded into a scratch
context, from the very bytes that then go into the live one; a pair that does not load is reported
and the old one kept, and it is tried again at the next check.

The bytes reach OpenSSL through an in-memory file (memfd) where the platform has one, else a
private temporary directory: load_cert_chain takes paths only.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

RELOAD_INTERVAL_S = 60.0  # how often the files are checked for a renewal

_Stamp = tuple[tuple[int, int, int, int], ...]


class TlsError(Exception):
    """The certificate or key cannot be read or used; the message names the file and the reason."""


def new_server_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _no_password() -> bytes:
    raise TlsError("the private key is encrypted; the router needs an unencrypted PEM key")


@contextlib.contextmanager
def _as_files(cert: bytes, key: bytes) -> Iterator[tuple[str, str]]:
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fds = []
        try:
            for data in (cert, key):
                fd = os.memfd_create("gpufleet-tls", 0)
                fds.append(fd)
                os.write(fd, data)
            yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}"
        finally:
            for fd in fds:
                os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="gpufleet-tls-") as tmp:  # mode 0700
        paths = []
        for name, data in (("cert.pem", cert), ("key.pem", key)):
            path = os.path.join(tmp, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            paths.append(path)
        yield paths[0], paths[1]


def load_pair(ctx: ssl.SSLContext, cert: bytes, key: bytes, where: str) -> None:
    """Load a PEM certificate chain and its key (bytes) into `ctx`, or raise TlsError."""
    if b"-----BEGIN" not in cert:
        raise TlsError(f"{where}: the certificate is not PEM")
    if b"-----BEGIN" not in key:
        raise TlsError(f"{where}: the private key is not PEM")
    try:
        with _as_files(cert, key) as (cert_path, key_path):
            ctx.load_cert_chain(cert_path, key_path, password=_no_password)
    except TlsError as exc:
        raise TlsError(f"{where}: {exc}") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise TlsError(f"{where}: cannot be used ({reason})") from None


class CertReloader:
    """The router's server SSLContext (`context`), kept in step with two PEM files.

    The constructor loads them or raises TlsError (the CLI exits 3). `check()` reloads when a file's
    stat changed; `run()` calls it every `interval_s`. `on_event(message)` hears each reload and
    each failed one."""

    def __init__(
        self,
        cert_file: str | os.PathLike[str],
        key_file: str | os.PathLike[str],
        interval_s: float = RELOAD_INTERVAL_S,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self.cert_file = Path(cert_file).expanduser()
        self.key_file = Path(key_file).expanduser()
        self.interval_s = interval_s
        self.on_event = on_event
        self.context = new_server_context()
        self.reloads = 0
        self.error: str | None = None  # why the last reload failed (the old pair is still served)
        stamp, cert, key = self._snapshot()
        load_pair(self.context, cert, key, self._where)
        self._stamp = stamp
        self._pem = (cert, key)  # the pair served: put back should a reload fail half-way

    @property
    def _where(self) -> str:
        return f"TLS certificate {self.cert_file} with key {self.key_file}"

    def _stat(self) -> _Stamp:
        out = []
        for path, what in ((self.cert_file, "certificate"), (self.key_file, "key")):
            try:
                st = path.stat()
            except OSError as exc:
                raise TlsError(f"cannot read the TLS {what} file {path}: {exc.strerror or exc}") from None
            # The inode too: a Secret volume swaps in new files that may keep the old mtime.
            out.append((st.st_mtime_ns, st.st_ino, st.st_size, st.st_dev))
        return tuple(out)

    def _snapshot(self) -> tuple[_Stamp, bytes, bytes]:
        """Both files' bytes as of one stat (read again if a file changed while being read)."""
        for _ in range(3):
            before = self._stat()
            data = []
            for path, what in ((self.cert_file, "certificate"), (self.key_file, "key")):
                try:
                    data.append(path.read_bytes())
                except OSError as exc:
                    raise TlsError(f"cannot read the TLS {what} file {path}: {exc.strerror or exc}") from None
            if self._stat() == before:
                return before, data[0], data[1]
        raise TlsError(f"{self._where}: the files keep changing while being read")

    def check(self) -> bool:
        """Reload if the files changed; True when a new pair is now served."""
        try:
            if self._stat() == self._stamp:
                return False
            stamp, cert, key = self._snapshot()
            load_pair(new_server_context(), cert, key, self._where)  # a scratch context first
        except TlsError as exc:
            if str(exc) != self.error:  # report each new problem once
                self.error = str(exc)
                self._tell(f"TLS reload failed, still serving the previous certificate: {exc}")
            return False
        try:
            load_pair(self.context, cert, key, self._where)  # the same bytes: loads as they just did
        except TlsError as exc:
            load_pair(self.context, *self._pem, self._where)
            self.error = str(exc)
            self._tell(f"TLS reload failed, still serving the previous certificate: {exc}")
            return False
        self._stamp = stamp
        self._pem = (cert, key)
        self.reloads += 1
        self.error = None
        self._tell(f"TLS certificate reloaded from {self.cert_file}")
        return True

    def _tell(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.check()
