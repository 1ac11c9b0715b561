"""TLS on a real agent and a real router, with certificates made at run time (`trustme`): the
CLI verifies against the CA it is given and refuses a wrong one, client certificates are
required when `tls_client_ca` is set, and SIGHUP swaps a renewed certificate in without a
restart."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme

from tests.conftest import AGENT_BIN, free_port, wait_for

WATTOPS = Path(sys.executable).with_name("wattops")


def trusting(ca: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if cert is not None:
        context.load_cert_chain(cert, key)
    return context


class Certs:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(self.ca_file)
        self.cert, self.key = folder / "server.pem", folder / "server.key"
        self.issue_server()
        client = self.ca.issue_cert("oncall@example.org")
        self.client_cert, self.client_key = folder / "client.pem", folder / "client.key"
        client.cert_chain_pems[0].write_to_path(self.client_cert)
        client.private_key_pem.write_to_path(self.client_key)

    def client(self, name: str, role: str | None) -> tuple[Path, Path]:
        """A client certificate for `name` (its CN), carrying `role` as O=wattops:<role>."""
        org = f"wattops:{role}" if role else "Example"
        leaf = self.ca.issue_cert(f"{name}@example.org", common_name=name, organization_name=org)
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        leaf.cert_chain_pems[0].write_to_path(cert)
        leaf.private_key_pem.write_to_path(key)
        return cert, key

    def issue_server(self) -> None:
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        server.cert_chain_pems[0].write_to_path(self.cert)
        server.private_key_pem.write_to_path(self.key)


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


def start_agent(folder: Path, extra: str) -> tuple[subprocess.Popen[bytes], str]:
    """An agent with no deployment (TLS is the agent's, not its engines'), over HTTPS."""
    port = free_port()
    config = folder / "agent.toml"
    config.write_text(f'[agent]\nnode = "tls-node"\nlisten = "127.0.0.1:{port}"\n'
                      f'state_dir = "{folder}/state"\nsensor = "estimate"\n{extra}')  # fmt: skip
    log = (folder / "agent.log").open("ab")
    proc = subprocess.Popen([str(AGENT_BIN), "--config", str(config)], stdout=log, stderr=log)
    return proc, f"https://127.0.0.1:{port}"


@pytest.fixture
def tls_agent(certs: Certs) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    proc, url = start_agent(certs.folder, f'tls_cert = "{certs.cert}"\ntls_key = "{certs.key}"\n')
    try:
        with httpx.Client(verify=trusting(certs.ca_file), timeout=5) as c:
            wait_for(lambda: c.get(url + "/healthz").status_code == 200, 60, "the HTTPS agent")
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(30)


def served_cert(url: str, ca: Path) -> bytes:
    """The DER certificate a new connection to `url` is served."""
    host, port = url.removeprefix("https://").split(":")
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:  # fmt: skip
        found = tls.getpeercert(binary_form=True)
    assert found is not None
    return found


def test_the_cli_verifies_the_agent_against_its_ca(
    certs: Certs, tls_agent: tuple[str, object]
) -> None:
    url, _ = tls_agent
    ok = subprocess.run([str(WATTOPS), "--ca", str(certs.ca_file), "status", "--json",
                         "--agent", url], capture_output=True, text=True, timeout=60)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert '"tls-node"' in ok.stdout  # the node's snapshot, read over HTTPS
    via_env = subprocess.run([str(WATTOPS), "status", "--agent", url], capture_output=True,
                             text=True, timeout=60,
                             env={**os.environ, "WATTOPS_CA": str(certs.ca_file)})  # fmt: skip
    assert via_env.returncode == 0, via_env.stderr
    # Another CA's bundle: the agent's certificate does not verify, nothing is read.
    stranger = trustme.CA()
    other = certs.folder / "other-ca.pem"
    stranger.cert_pem.write_to_path(other)
    refused = subprocess.run([str(WATTOPS), "--ca", str(other), "status", "--agent", url],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    assert refused.returncode == 1
    assert "certificate verify failed" in refused.stderr or "CERTIFICATE" in refused.stderr
    # Plain HTTP to the HTTPS port gets nothing.
    with pytest.raises(httpx.HTTPError):
        httpx.get(url.replace("https://", "http://") + "/healthz", timeout=5)


def test_sighup_swaps_in_a_renewed_certificate_without_a_restart(
    certs: Certs, tls_agent: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, proc = tls_agent
    before = served_cert(url, certs.ca_file)
    with httpx.Client(verify=trusting(certs.ca_file), timeout=5) as kept:
        assert kept.get(url + "/healthz").status_code == 200  # a connection open across it
        certs.issue_server()
        proc.send_signal(signal.SIGHUP)
        after = wait_for(lambda: (c := served_cert(url, certs.ca_file)) != before and c, 10,
                         "the renewed certificate")  # fmt: skip
        assert after == ssl.PEM_cert_to_DER_cert(certs.cert.read_text())
        assert kept.get(url + "/healthz").status_code == 200
    assert proc.poll() is None  # the same process all along
    # A broken pair is refused and the served one kept.
    certs.key.write_text("not a key")
    proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert served_cert(url, certs.ca_file) == after and proc.poll() is None


def test_client_certificates_are_required_with_a_client_ca(certs: Certs) -> None:
    extra = (f'tls_cert = "{certs.cert}"\ntls_key = "{certs.key}"\n'
             f'tls_client_ca = "{certs.ca_file}"\n')  # fmt: skip
    proc, url = start_agent(certs.folder, extra)
    try:
        mine = trusting(certs.ca_file, certs.client_cert, certs.client_key)
        with_cert = httpx.Client(verify=mine, timeout=5)
        wait_for(lambda: with_cert.get(url + "/healthz").status_code == 200, 60, "mTLS agent")
        with pytest.raises(httpx.HTTPError):  # refused in the handshake, before any HTTP
            httpx.get(url + "/healthz", verify=trusting(certs.ca_file), timeout=5)
        env = {**os.environ, "WATTOPS_CA": str(certs.ca_file),
               "WATTOPS_CLIENT_CERT": str(certs.client_cert),
               "WATTOPS_CLIENT_KEY": str(certs.client_key)}  # fmt: skip
        shown = subprocess.run([str(WATTOPS), "status", "--agent", url], capture_output=True,
                               text=True, timeout=60, env=env)  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        with_cert.close()
    finally:
        proc.terminate()
        proc.wait(30)


def test_bad_tls_settings_stop_the_agent_naming_them(certs: Certs) -> None:
    for extra, said in (
        (f'tls_cert = "{certs.cert}"\n', "tls_cert and tls_key go together"),
        (f'tls_cert = "{certs.cert}"\ntls_key = "{certs.folder}/missing.key"\n', "no such file"),
        (f'tls_cert = "{certs.ca_file}"\ntls_key = "{certs.client_key}"\n', "did not load"),
    ):  # fmt: skip
        proc, _ = start_agent(certs.folder, extra)
        assert proc.wait(60) == 2
        log = (certs.folder / "agent.log").read_text()
        assert said in log, log[-2000:]


def test_a_router_serves_https_and_follows_an_https_agent(
    certs: Certs, tls_agent: tuple[str, object]
) -> None:
    from tests.routers import ROUTER_BIN

    agent_url, _ = tls_agent
    port = free_port()
    config = certs.folder / "router.toml"
    config.write_text(
        f'[router]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{certs.folder}/router-state"\n'
        f'tls_cert = "{certs.cert}"\ntls_key = "{certs.key}"\n\n'
        f'[[agents]]\nurl = "{agent_url}"\n\n'
        '[[routes]]\nname = "chat"\ncandidates = ["*/tiny"]\nreference = "tls-node/tiny"\n'
    )
    log = (certs.folder / "router.log").open("ab")
    # The router verifies the agent against the same CA ($WATTOPS_CA), as the CLI does.
    proc = subprocess.Popen([str(ROUTER_BIN), "--config", str(config)], stdout=log, stderr=log,
                            env={**os.environ, "WATTOPS_CA": str(certs.ca_file)})  # fmt: skip
    try:
        with httpx.Client(verify=trusting(certs.ca_file), timeout=5) as c:
            url = f"https://127.0.0.1:{port}/v1/router"
            wait_for(lambda: c.get(url).json()["agents_live"] == 1, 60,
                     "the router to follow the agent over HTTPS")  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_client_certificate_names_the_caller_and_carries_its_role(certs: Certs) -> None:
    """With `tls_client_ca` the certificate is a credential: O=wattops:<role> gives the role
    (table below), one without a role needs a bearer token, and a token sent with any
    certificate decides instead. The audit log names the certificate's holder."""
    extra = (f'tls_cert = "{certs.cert}"\ntls_key = "{certs.key}"\n'
             f'tls_client_ca = "{certs.ca_file}"\n\n'
             '[[tokens]]\nname = "pager"\nrole = "operator"\n'
             'token = "pager-token-0123456789abcdef"\n')  # fmt: skip
    proc, url = start_agent(certs.folder, extra)
    holders = (("vera", "viewer"), ("otto", "operator"), ("ada", "admin"), ("nora", None))
    clients = {role: certs.client(name, role) for name, role in holders}
    pager = {"Authorization": "Bearer pager-token-0123456789abcdef"}

    def client(role: str | None) -> httpx.Client:
        cert, key = clients[role]
        return httpx.Client(verify=trusting(certs.ca_file, cert, key), timeout=5, base_url=url)

    try:
        with client("admin") as admin:
            wait_for(lambda: admin.get("/healthz").status_code == 200, 60, "mTLS agent")
            assert admin.get("/v1/whoami").json() | {"reads": None} == {
                "name": "ada", "role": "admin", "via": "certificate", "open": False,
                "reads": None, "may_control": True}  # fmt: skip
        scale = "/v1/deployments/none/scale"
        table = {"viewer": 403, "operator": 404, "admin": 404, None: 401}  # 404: past the check
        for role, status in table.items():
            with client(role) as c:
                resp = c.post(scale, json={"replicas": 1})
                assert resp.status_code == status, (role, resp.text)
                if role == "viewer":
                    assert "certificate 'vera' is a viewer" in resp.text
                if role is None:
                    assert "certificate 'nora' carries no role" in resp.text
                    assert "O=wattops:operator" in resp.text
        with client(None) as nora:  # a token decides for a certificate without a role
            resp = nora.post(scale, json={"replicas": 1}, headers=pager)
            assert resp.status_code == 404, resp.text
        with client("viewer") as vera:  # and a token decides over a certificate's role
            resp = vera.post(scale, json={"replicas": 1}, headers=pager)
            assert resp.status_code == 404, resp.text
        with client("admin") as admin:
            lines = admin.get("/v1/audit").json()["entries"]
        who = [(line["who"], line["status"]) for line in lines if line["path"] == scale]
        assert who == [("vera", 403), ("otto", 404), ("ada", 404), ("certificate nora", 401),
                       ("pager", 404), ("pager", 404)]  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)


def test_a_router_takes_roles_from_client_certificates(certs: Certs) -> None:
    from tests.routers import ROUTER_BIN

    port = free_port()
    config = certs.folder / "router.toml"
    config.write_text(
        f'[router]\nlisten = "127.0.0.1:{port}"\nstate_dir = "{certs.folder}/router-state"\n'
        f'tls_cert = "{certs.cert}"\ntls_key = "{certs.key}"\n'
        f'tls_client_ca = "{certs.ca_file}"\n\n'
        '[[agents]]\nurl = "http://127.0.0.1:9"\n\n'
        '[[routes]]\nname = "chat"\ncandidates = ["*/tiny"]\nreference = "n/tiny"\n'
    )
    log = (certs.folder / "router.log").open("ab")
    proc = subprocess.Popen([str(ROUTER_BIN), "--config", str(config)], stdout=log, stderr=log)
    base = f"https://127.0.0.1:{port}"
    try:
        viewer, operator = certs.client("vera", "viewer"), certs.client("otto", "operator")
        with httpx.Client(verify=trusting(certs.ca_file, *viewer), base_url=base,
                          timeout=5) as vera:  # fmt: skip
            wait_for(lambda: vera.get("/healthz").status_code == 200, 60, "the mTLS router")
            assert vera.get("/v1/whoami").json()["name"] == "vera"
            assert vera.get("/v1/router").status_code == 200
            refused = vera.patch("/v1/routes/chat", json={"policy": "greenest"})
            assert refused.status_code == 403, refused.text
            assert "certificate 'vera' is a viewer" in refused.text
        with httpx.Client(verify=trusting(certs.ca_file, *operator), base_url=base,
                          timeout=5) as otto:  # fmt: skip
            changed = otto.patch("/v1/routes/chat", json={"policy": "greenest"})
            assert changed.status_code == 200, changed.text
            assert changed.json()["policy"] == "greenest"
    finally:
        proc.terminate()
        proc.wait(30)


async def test_a_console_with_a_viewer_certificate_says_so_and_disables_actions(
    certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The console names the credential the agent named the caller by: here a client
    certificate with the viewer role, not a token."""
    from tests.test_console import SIZE, until
    from wattops.console.app import make_app

    extra = (f'tls_cert = "{certs.cert}"\ntls_key = "{certs.key}"\n'
             f'tls_client_ca = "{certs.ca_file}"\n')  # fmt: skip
    proc, url = start_agent(certs.folder, extra)
    cert, key = certs.client("vera", "viewer")
    monkeypatch.setenv("WATTOPS_CA", str(certs.ca_file))
    monkeypatch.setenv("WATTOPS_CLIENT_CERT", str(cert))
    monkeypatch.setenv("WATTOPS_CLIENT_KEY", str(key))
    try:
        with httpx.Client(verify=trusting(certs.ca_file, cert, key), timeout=5) as c:
            wait_for(lambda: c.get(url + "/healthz").status_code == 200, 60, "the mTLS agent")
        app = make_app([url], refresh_s=0.1)
        async with app.run_test(size=SIZE) as pilot:
            screen = app.fleet_screen
            await until(pilot, lambda: url in screen.denied, 30, "the agent's answer on roles")
            assert screen.denied[url] == (
                "actions need an operator certificate (certificate 'vera' is a viewer)"
            )
            assert screen.check_action("scale_up", ()) is None
    finally:
        proc.terminate()
        proc.wait(30)
