"""HTTPS: with a certificate and key set, uvicorn serves the API over TLS only (self-signed, made here)."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import ssl
import threading
import time

import httpx
import pytest

from freshet.serving.app import create_app
from freshet.serving.online import OnlineFeatureReader
from freshet.serving.transport import uvicorn_options
from freshet.settings import SettingsError, load_settings
from test_serving_support import applied_settings, feast_store  # noqa: F401 - fixtures

pytestmark = pytest.mark.integration

TOKENS = {"admin": "tls-admin", "predict": "tls-predict", "features": "tls-features"}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "freshet test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    d = tmp_path_factory.mktemp("tls")
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def https_url(applied_settings, feast_store, certificate):  # noqa: F811
    import uvicorn

    from freshet.app.stack import free_port

    cert, key = certificate
    s = dataclasses.replace(applied_settings, http_port=free_port(), http_tls_certfile=str(cert),
                            http_tls_keyfile=str(key))
    app = create_app(s, reader=OnlineFeatureReader(s, store=feast_store), follow_models=False, log_predictions=False,
                     tokens=TOKENS)
    server = uvicorn.Server(uvicorn.Config(app, **{**uvicorn_options(s), "log_level": "warning"}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"127.0.0.1:{s.http_port}"
    finally:
        server.should_exit = True
        thread.join(15)


def test_the_api_answers_over_https_with_the_configured_certificate(https_url, certificate):
    trust = ssl.create_default_context(cafile=str(certificate[0]))
    with httpx.Client(verify=trust, timeout=10) as client:
        assert client.get(f"https://{https_url}/health").json() == {"status": "ok"}
        resp = client.post(f"https://{https_url}/get-online-features",
                           headers={"Authorization": f"Bearer {TOKENS['features']}"},
                           json={"features": ["card_txn_stats:sum_amount_300s"], "entities": {"card_id": ["x"]}})
        assert resp.status_code == 200, resp.text
        assert client.get(f"https://{https_url}/predict").status_code == 401  # the token is what TLS protects


def test_plain_http_gets_no_answer_and_an_untrusted_client_refuses_the_certificate(https_url):
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{https_url}/health", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"https://{https_url}/health", timeout=5)


def test_a_certificate_without_its_key_or_a_missing_file_fails_at_start_up_naming_the_setting(certificate, tmp_path):
    with pytest.raises(SettingsError, match="FRESHET_HTTP_TLS_CERTFILE and FRESHET_HTTP_TLS_KEYFILE go together"):
        load_settings({"FRESHET_HTTP_TLS_CERTFILE": str(certificate[0])})
    with pytest.raises(SettingsError, match="FRESHET_HTTP_TLS_KEYFILE=.* is not a readable file"):
        load_settings({"FRESHET_HTTP_TLS_CERTFILE": str(certificate[0]),
                       "FRESHET_HTTP_TLS_KEYFILE": str(tmp_path / "missing.pem")})
