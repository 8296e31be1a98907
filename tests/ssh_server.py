"""A real OpenSSH server on localhost for the tests: root login by a generated key only, on a free port.

A user's ~/.ssh/config is what makes `ssh HOST` work for DeepSpeed's launcher
(its ssh check and pdsh both run plain `ssh`); the fixture writes one of its
own and puts an `ssh` first on PATH that passes it with -F, so nothing under
~/.ssh is touched. The server runs in the foreground as a child of the test
process and is killed by pid at the end.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from slurm_cluster import free_ports

SSHD = "/usr/sbin/sshd"


def missing_binaries() -> list[str]:
    missing = [b for b in ("ssh", "ssh-keygen", "pdsh") if shutil.which(b) is None]
    return missing + ([] if Path(SSHD).is_file() else [SSHD])


@dataclass
class SshServer:
    root: Path
    port: int
    bin_dir: Path
    """Holds the `ssh` wrapper: put it first on PATH."""

    def ssh(self, host: str, *cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bin_dir / "ssh"), host, *cmd], capture_output=True, text=True, timeout=30)


@contextlib.contextmanager
def ssh_server(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    for name in ("host_key", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
    (root / "authorized_keys").write_text((root / "id_ed25519.pub").read_text())
    (port,) = free_ports(1)
    # sshd refuses to start without its privilege-separation directory (Debian creates it at boot).
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    (root / "sshd_config").write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {root}/host_key
PidFile {root}/sshd.pid
AuthorizedKeysFile {root}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
""")
    (root / "ssh_config").write_text(f"""\
Host *
    Port {port}
    IdentityFile {root}/id_ed25519
    IdentitiesOnly yes
    BatchMode yes
    StrictHostKeyChecking no
    UserKnownHostsFile {root}/known_hosts
    LogLevel ERROR
""")
    bin_dir = root / "bin"
    bin_dir.mkdir(exist_ok=True)
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {root}/ssh_config "$@"\n')
    wrapper.chmod(0o755)
    log = open(root / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = SshServer(root, port, bin_dir)
    try:
        deadline = time.monotonic() + 30
        while server.ssh("localhost", "true").returncode != 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not come up:\n{(root / 'sshd.log').read_text()}")
            time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
