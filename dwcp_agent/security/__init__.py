"""Channel security: cluster PKI, TLS on the agent ports, bounded pre-authentication work."""

# The modules other packages use; the rest are internal to security/.
__all__ = ["channels", "pki", "pki_cli", "preauth", "sealed"]
