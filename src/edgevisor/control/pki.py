"""The controller's side of the fleet PKI: the CA and the host certificate endpoint.

The CA lives in ``<data_dir>/pki/`` (key mode 0600), created on the controller's first
start (:func:`ensure_fleet_ca`, a start-up entry of ``BACKGROUND_LOOPS``) or first use.
Hosts get their certificate at join (``HostJoin.csr_pem``); hosts that joined before
ask at ``POST /v1/hosts/{name}/certificate`` with their per-host credential. The CN is
always the authenticated host's name, whatever the CSR says.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from edgevisor.control.auth import require_host, state_of
from edgevisor.control.state import ControllerState
from edgevisor.errors import Forbidden
from edgevisor.pki import FleetCA

__all__ = ["HostCertificate", "ensure_fleet_ca", "fleet_ca", "issue_host_cert", "router"]

router = APIRouter(prefix="/v1")
HostAuth = Annotated[str, Depends(require_host)]

_cas: dict[Path, FleetCA] = {}
_lock = threading.Lock()


class CertificateRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    csr_pem: str = Field(max_length=16384, description="PEM CSR over the host's own key.")


class HostCertificate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    host: str
    host_cert_pem: str
    ca_cert_pem: str


def fleet_ca(st: ControllerState) -> FleetCA:
    """The fleet CA of this controller (loaded once, created if absent)."""
    d = st.settings.data_dir / "pki"
    with _lock:
        ca = _cas.get(d)
        if ca is None:
            ca = _cas[d] = FleetCA.load_or_create(d)
        return ca


def issue_host_cert(st: ControllerState, host: str, csr_pem: str) -> tuple[str, str]:
    """(host certificate, CA certificate) for ``host`` over the CSR's key."""
    ca = fleet_ca(st)
    return ca.sign_host(host, csr_pem), ca.cert_pem


async def ensure_fleet_ca(st: ControllerState) -> None:
    """Start-up step: create the CA now rather than at the first join."""
    fleet_ca(st)


@router.post("/hosts/{name}/certificate", response_model=HostCertificate)
def host_certificate(
    name: str, body: CertificateRequest, host_name: HostAuth, request: Request
) -> HostCertificate:
    if name != host_name:
        raise Forbidden(f"this credential belongs to host {host_name!r}, not {name!r}")
    cert, ca = issue_host_cert(state_of(request), host_name, body.csr_pem)
    return HostCertificate(host=host_name, host_cert_pem=cert, ca_cert_pem=ca)
