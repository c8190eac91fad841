"""The real OpenID Provider for tests lives in ``enforcer.localidp`` (the demo uses it too)."""

from enforcer.cli.localidp import OPUser, RunningOP, TLSMaterial, make_tls_material, spki_sha256_b64, start_op

__all__ = ["OPUser", "RunningOP", "TLSMaterial", "make_tls_material", "spki_sha256_b64", "start_op"]
