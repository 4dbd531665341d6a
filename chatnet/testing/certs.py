"""Throwaway TLS certificates for a test cluster, made with the ``openssl`` command.

:func:`make_cluster_certs` follows the recipe of docs/operations.md ("Certificates for a test
cluster"): one CA, and one server certificate that every replica shares, whose subject
alternative names list every replica's address — clients verify the address they dial, and
replicas the ``--peers`` entry they dial, so a missing address is a failed handshake, not a
warning.  :func:`tls_server_flags` gives the chatserver flags that serve them.

Why ``openssl`` and not Python: the standard library can verify certificates but not make
them, and the project stays standard-library only.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess

__all__ = ["make_cluster_certs", "tls_server_flags", "san_entries", "openssl_missing"]

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def openssl_missing() -> str | None:
    """Why certificates cannot be made here, or None."""
    return None if shutil.which("openssl") else "the openssl command is not installed"


def san_entries(hosts) -> str:
    """``IP:a,IP:b,DNS:c`` for ``hosts`` (duplicates once; addresses as IP, names as DNS)."""
    entries = []
    for host in dict.fromkeys(hosts):
        try:
            entries.append(f"IP:{ipaddress.ip_address(host)}")
        except ValueError:
            entries.append(f"DNS:{host}")
    return ",".join(entries)


def make_cluster_certs(directory: str, hosts, days: int = 2) -> dict:
    """A CA and a server certificate naming every host of ``hosts``, in ``directory``: paths
    ``ca``, ``cert``, ``key``.  The keys are mode 0600.  Raises ``subprocess.CalledProcessError``
    (with openssl's stderr) or ``FileNotFoundError`` when openssl fails or is missing."""
    os.makedirs(directory, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", *EC, "-keyout", "ca.key", "-out", "ca.pem", "-days", str(days),
            "-subj", "/CN=chatnet chaos CA", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    openssl("req", *EC, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=chatnet replica")
    with open(os.path.join(directory, "san.ext"), "w") as f:
        f.write(f"subjectAltName={san_entries(hosts)}\nbasicConstraints=CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.pem", "-days", str(days), "-extfile", "san.ext")
    for key in ("ca.key", "server.key"):
        os.chmod(os.path.join(directory, key), 0o600)
    return {name: os.path.join(directory, file) for name, file in
            (("ca", "ca.pem"), ("cert", "server.pem"), ("key", "server.key"))}


def tls_server_flags(certs: dict, require: bool = True) -> list[str]:
    """The chatserver flags serving ``certs`` (client port and peer links, peers verified
    against the CA); ``require`` adds ``--require-tls`` so that a plaintext client is refused."""
    flags = ["--tls-cert", certs["cert"], "--tls-key", certs["key"], "--tls-ca", certs["ca"]]
    return [*flags, "--require-tls"] if require else flags
