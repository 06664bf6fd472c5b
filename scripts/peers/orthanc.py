"""A real Orthanc PACS with DICOMweb, started on loopback for the demo and the tests.

Orthanc has no bind-address option: it listens on every interface. `RemoteAccessAllowed:
false` makes it refuse HTTP requests that do not come from the machine itself, and
authentication is off, so keep this PACS to demos and tests on a trusted host.

    with Orthanc(work_dir) as pacs:
        pacs.upload(dicom_bytes)
        DicomWebClient(pacs.dicomweb_url, timeout_s=10)...
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

from interop.runtime.processes import free_port

DEFAULT_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
INSTALL_HINT = "install it with: apt-get install orthanc orthanc-dicomweb"


class OrthancError(RuntimeError):
    """Orthanc is missing, did not start, or refused an upload."""


def find_orthanc() -> tuple[Path, Path]:
    """Paths of the Orthanc binary and of its DICOMweb plugin, or a clear error."""
    found = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if not found:
        raise OrthancError(f"the Orthanc binary was not found on PATH or in /usr/sbin; {INSTALL_HINT}")
    plugin = Path(os.environ.get("ORTHANC_DICOMWEB_PLUGIN", DEFAULT_PLUGIN))
    if not plugin.is_file():
        raise OrthancError(f"the Orthanc DICOMweb plugin was not found at {plugin}; {INSTALL_HINT}")
    return Path(found), plugin


class Orthanc:
    """One Orthanc process whose storage, index, config and log live in `work_dir`."""

    def __init__(
        self,
        work_dir: str | os.PathLike[str],
        *,
        http_port: int | None = None,
        dicom_port: int | None = None,
        aet: str = "ORTHANC",
        start_timeout_s: float = 30.0,
    ) -> None:
        self.work_dir = Path(work_dir)
        self.aet = aet
        self.start_timeout_s = start_timeout_s
        self._http_port = http_port
        self._dicom_port = dicom_port
        self._process: subprocess.Popen[bytes] | None = None
        self._session: requests.Session | None = None
        self.startup_seconds: float | None = None

    # -- addresses ---------------------------------------------------------------------------
    @property
    def http_port(self) -> int:
        if self._http_port is None:
            raise OrthancError("Orthanc has not been started")
        return self._http_port

    @property
    def dicom_port(self) -> int:
        if self._dicom_port is None:
            raise OrthancError("Orthanc has not been started")
        return self._dicom_port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def config_path(self) -> Path:
        return self.work_dir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "orthanc.log"

    def config(self, plugin: Path) -> dict[str, Any]:
        """The configuration written to `orthanc.json`."""
        return {
            "Name": "interop-test-pacs",
            "StorageDirectory": str(self.work_dir / "storage"),
            "IndexDirectory": str(self.work_dir / "index"),
            "StorageCompression": False,
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpCompressionEnabled": False,  # loopback: gzip of multi-MB images only costs CPU
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowGet": True,
            "Plugins": [str(plugin)],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "WadoRoot": "/wado",
                "Host": "127.0.0.1",
                "Ssl": False,
            },
        }

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Orthanc:
        if self._process is not None:
            return self
        binary, plugin = find_orthanc()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if self._http_port is None:
            self._http_port = free_port()
        if self._dicom_port is None:
            self._dicom_port = free_port()
            while self._dicom_port == self._http_port:
                self._dicom_port = free_port()
        self.config_path.write_text(json.dumps(self.config(plugin), indent=2), encoding="utf-8")
        began = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [str(binary), str(self.config_path)],
                cwd=self.work_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C in the terminal is not delivered twice
            )
        self._session = requests.Session()
        try:
            self._wait_ready(began)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def _wait_ready(self, began: float) -> None:
        assert self._process is not None and self._session is not None
        deadline = began + self.start_timeout_s
        while True:
            code = self._process.poll()
            if code is not None:
                raise OrthancError(f"Orthanc exited with status {code} while starting\n{self.log_tail()}")
            try:
                response = self._session.get(f"{self.url}/system", timeout=2)
                if response.status_code == 200:
                    return
            except requests.RequestException:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise OrthancError(
                    f"Orthanc did not answer GET /system within {self.start_timeout_s:.0f} s\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if Orthanc has not exited after `timeout_s`."""
        process, self._process = self._process, None
        if self._session is not None:
            self._session.close()
            self._session = None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no Orthanc log)"
        return "\n".join(text.splitlines()[-lines:])

    # -- REST helpers ------------------------------------------------------------------------
    def upload(self, dicom_bytes: bytes) -> dict[str, Any]:
        """Store one DICOM Part 10 file through `POST /instances`; Orthanc's answer as a dict."""
        if self._session is None:
            raise OrthancError("Orthanc has not been started")
        response = self._session.post(
            f"{self.url}/instances",
            data=dicom_bytes,
            headers={"Content-Type": "application/dicom"},
            timeout=60,
        )
        if response.status_code != 200:
            raise OrthancError(f"Orthanc refused the upload: HTTP {response.status_code} {response.text[:200]}")
        result: dict[str, Any] = response.json()
        return result

    def delete_all(self) -> None:
        """Remove every patient (and so every study) from the PACS."""
        if self._session is None:
            raise OrthancError("Orthanc has not been started")
        patients = self._session.get(f"{self.url}/patients", timeout=30)
        patients.raise_for_status()
        for patient in patients.json():
            self._session.delete(f"{self.url}/patients/{patient}", timeout=30).raise_for_status()
