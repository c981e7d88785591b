"""API keys and the gateway's choice of TLS for its internal channels, without servers."""
from __future__ import annotations

from common.config import load_config
from common.security import ApiKeys
from gateway.__main__ import GatewayConfig


def test_api_keys_accept_only_a_bearer_of_a_listed_key(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text("# comment\nsecond\n\n")
    keys = ApiKeys.load("first", str(key_file))
    assert keys.allows("Bearer first") and keys.allows("bearer second") and keys.allows("Bearer  second ")
    for bad in (None, "", "first", "Basic first", "Bearer", "Bearer firs", "Bearer firstx", "Bearer # comment",
                "Bearer \udcff"):   # the last: a non-UTF-8 header byte as aiohttp passes it on
        assert not keys.allows(bad), bad
    assert not ApiKeys([]) and ApiKeys([]).allows(None)   # no keys: nothing asked


def test_the_gateway_dials_its_upstreams_over_tls_only_with_a_ca(tmp_path):
    files = {name: tmp_path / name for name in ("gw.pem", "gw.key", "client.pem", "client.key", "ca.pem")}
    for path in files.values():
        path.write_text("x")
    public_only = load_config(GatewayConfig, ["--tls-cert", str(files["gw.pem"]), "--tls-key", str(files["gw.key"])])
    assert public_only.tls.serves_tls and public_only.upstream_tls is None
    mutual = load_config(GatewayConfig, ["--tls-cert", str(files["gw.pem"]), "--tls-key", str(files["gw.key"]),
                                         "--tls-ca", str(files["ca.pem"])])
    assert (mutual.upstream_tls.cert, mutual.upstream_tls.key) == (str(files["gw.pem"]), str(files["gw.key"]))
    own_pair = load_config(GatewayConfig, ["--tls-ca", str(files["ca.pem"]), "--tls-client-cert",
                                           str(files["client.pem"]), "--tls-client-key", str(files["client.key"])])
    assert (own_pair.upstream_tls.cert, own_pair.upstream_tls.key) == (str(files["client.pem"]),
                                                                        str(files["client.key"]))
