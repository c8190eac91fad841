"""The enforcer's error vocabulary: every reason code, the flow outcomes, the base exception.

A :class:`Reason` is the one stable code the enforcer writes for a request: into the flow
record (``reason``), onto the page it answers with, and as the ``reason`` metric label. An
:class:`Outcome` is the flow record's ``decision``. Every exception the enforcer raises on
purpose derives from :class:`EnforcerError` and carries a ``Reason`` and an HTTP status.

Codes are never built or rewritten with string operations: each one is a member below, so a
grep for a code finds every place that writes it. The members, by the step that writes them::

    Reason
    ├── framing       the HTTP parser or the gate refused the bytes (400, 405, 413, 414, 431,
    │                 501, 505): malformed_request, header_too_large, target_too_long, ...;
    │                 a client over a limit (408, 429): body_too_slow, too_many_uploads, ...
    ├── routing       SNI, Host and destination must name one service (400, 421): bad_host, ...
    ├── path          the request-target has no single canonical path (400, 414):
    │                 too_long, bad_target, bad_char, fragment, semicolon, encoded_*, ...
    ├── policy        the decision on the canonical path: public, allowed, login_required,
    │                 no_matching_endpoint, method_not_allowed, missing_tags
    ├── login         starting a login: idp_unavailable, session_store_error
    ├── callback      the IdP sent the browser back: login_success, login_failed, callback_*,
    │                 idp_error, userinfo_sub_mismatch, claims_too_large
    ├── idp           talking to the IdP: discovery_*, jwks_*, token_*, userinfo_*
    ├── id_token      checking the ID token: id_token_*
    ├── logout_token  checking a back-channel logout token: logout_token_*
    ├── logout        logout, logout_confirm, backchannel_*
    ├── upstream      forwarding to the app: upstream_*, client_aborted, internal_error
    ├── reload        a definitions reload: reload_*
    ├── operator      start-up and operations, never a request: certificate_error,
    │                 source_unavailable, redirect_error, config_invalid
    └── unfinished    a flow record nobody filled in (a bug if it is ever written)

    EnforcerError(reason, status)
    ├── PathError            policy            the request-target is refused
    ├── OIDCError            identity.tokens   a login or logout-token step failed
    ├── SessionStoreError    identity.sessions the session store failed
    ├── UpstreamError        errors            the app could not be reached or answered garbage
    ├── ClientBodyError      errors            a request body was cut (too slow, too many uploads)
    ├── CertError            http.certs        a certificate cannot be issued or loaded
    ├── SourceError          config.sources    a definitions source cannot be read
    ├── RedirectError        net.ruleset       the nftables redirect cannot be applied
    └── ConfigError          config.issues     the configuration is invalid (keeps its issues)
"""

# ruff: noqa: S105 (member names such as TOKEN_* and *_TOKEN_* are reason codes, not passwords)

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Every code the enforcer writes to a flow record, a page or a metric label."""

    # framing: the HTTP parser (http.server) or the gate refused the bytes
    MALFORMED_REQUEST = "malformed_request"
    HEADER_TOO_LARGE = "header_too_large"
    TARGET_TOO_LONG = "target_too_long"
    TOO_MANY_HEADERS = "too_many_headers"
    BAD_VERSION = "bad_version"
    TE_IN_HTTP10 = "te_in_http10"
    UNSUPPORTED_TRANSFER_CODING = "unsupported_transfer_coding"
    UNDERSCORE_HEADER = "underscore_header"
    METHOD_NOT_SUPPORTED = "method_not_supported"
    UPGRADE_NOT_SUPPORTED = "upgrade_not_supported"
    ASTERISK_FORM = "asterisk_form"
    BODY_TOO_LARGE = "body_too_large"
    HEADER_TIMEOUT = "header_timeout"
    BODY_TOO_SLOW = "body_too_slow"
    READ_TOO_SLOW = "read_too_slow"
    TOO_MANY_UPLOADS = "too_many_uploads"
    CONNECTION_RATE = "connection_rate"

    # routing: which service the request is for
    BAD_HOST = "bad_host"
    UNKNOWN_HOST = "unknown_host"
    SNI_HOST_MISMATCH = "sni_host_mismatch"
    DESTINATION_MISMATCH = "destination_mismatch"
    UNKNOWN_SNI = "unknown_sni"

    # path: policy.canonical_path refused the request-target (PathError)
    TOO_LONG = "too_long"
    BAD_TARGET = "bad_target"
    BAD_CHAR = "bad_char"
    FRAGMENT = "fragment"
    SEMICOLON = "semicolon"
    ENCODED_SEPARATOR = "encoded_separator"
    ENCODED_CONTROL = "encoded_control"
    ENCODED_DELIMITER = "encoded_delimiter"
    BAD_ENCODING = "bad_encoding"

    # policy: policy.decide
    PUBLIC = "public"
    ALLOWED = "allowed"
    LOGIN_REQUIRED = "login_required"
    NO_MATCHING_ENDPOINT = "no_matching_endpoint"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    MISSING_TAGS = "missing_tags"

    # login: starting a login
    IDP_UNAVAILABLE = "idp_unavailable"
    SESSION_STORE_ERROR = "session_store_error"
    SESSION_STORE_UNAVAILABLE = "session_store_unavailable"

    # callback: the IdP sent the browser back
    LOGIN_SUCCESS = "login_success"
    LOGIN_FAILED = "login_failed"
    CALLBACK_METHOD = "callback_method"
    CALLBACK_PATH_NOT_EXACT = "callback_path_not_exact"
    CALLBACK_TOO_LARGE = "callback_too_large"
    CALLBACK_MALFORMED = "callback_malformed"
    CALLBACK_DUPLICATE_PARAMETER = "callback_duplicate_parameter"
    CALLBACK_NO_STATE = "callback_no_state"
    CALLBACK_REPLAYED = "callback_replayed"
    CALLBACK_UNKNOWN_STATE = "callback_unknown_state"
    CALLBACK_NOT_BOUND = "callback_not_bound"
    CALLBACK_ISS_MISMATCH = "callback_iss_mismatch"
    CALLBACK_ISS_MISSING = "callback_iss_missing"
    CALLBACK_NO_CODE = "callback_no_code"
    IDP_ERROR = "idp_error"
    USERINFO_SUB_MISMATCH = "userinfo_sub_mismatch"
    REFRESH_SUB_MISMATCH = "refresh_sub_mismatch"
    REFRESH_NO_ID_TOKEN = "refresh_no_id_token"
    REFRESH_TOKEN_UNREADABLE = "refresh_token_unreadable"
    CLAIMS_TOO_LARGE = "claims_too_large"

    # idp: the discovery document
    DISCOVERY_UNREACHABLE = "discovery_unreachable"
    DISCOVERY_HTTP_ERROR = "discovery_http_error"
    DISCOVERY_TOO_LARGE = "discovery_too_large"
    DISCOVERY_INVALID_JSON = "discovery_invalid_json"
    DISCOVERY_ISSUER_MISMATCH = "discovery_issuer_mismatch"
    DISCOVERY_BAD_ENDPOINT = "discovery_bad_endpoint"
    DISCOVERY_NO_CLIENT_AUTH = "discovery_no_client_auth"
    DISCOVERY_NO_CODE_FLOW = "discovery_no_code_flow"
    # idp: the JWK Set
    JWKS_UNREACHABLE = "jwks_unreachable"
    JWKS_HTTP_ERROR = "jwks_http_error"
    JWKS_TOO_LARGE = "jwks_too_large"
    JWKS_INVALID_JSON = "jwks_invalid_json"
    JWKS_INVALID = "jwks_invalid"
    # idp: the token endpoint (its RFC 6749 §5.2 error codes, then ours)
    TOKEN_INVALID_REQUEST = "token_invalid_request"
    TOKEN_INVALID_CLIENT = "token_invalid_client"
    TOKEN_INVALID_GRANT = "token_invalid_grant"
    TOKEN_UNAUTHORIZED_CLIENT = "token_unauthorized_client"
    TOKEN_UNSUPPORTED_GRANT_TYPE = "token_unsupported_grant_type"
    TOKEN_INVALID_SCOPE = "token_invalid_scope"
    TOKEN_SERVER_ERROR = "token_server_error"
    TOKEN_TEMPORARILY_UNAVAILABLE = "token_temporarily_unavailable"
    TOKEN_UNKNOWN = "token_unknown"
    TOKEN_UNREACHABLE = "token_unreachable"
    TOKEN_TOO_LARGE = "token_too_large"
    TOKEN_BAD_CONTENT_TYPE = "token_bad_content_type"
    TOKEN_INVALID_JSON = "token_invalid_json"
    TOKEN_NO_ID_TOKEN = "token_no_id_token"
    TOKEN_NO_ACCESS_TOKEN = "token_no_access_token"
    TOKEN_NO_TOKEN_TYPE = "token_no_token_type"
    # idp: the UserInfo endpoint
    USERINFO_UNREACHABLE = "userinfo_unreachable"
    USERINFO_HTTP_ERROR = "userinfo_http_error"
    USERINFO_TOO_LARGE = "userinfo_too_large"
    USERINFO_INVALID_JSON = "userinfo_invalid_json"

    # id_token: identity.tokens on an ID token
    ID_TOKEN_TOO_LARGE = "id_token_too_large"
    ID_TOKEN_MALFORMED = "id_token_malformed"
    ID_TOKEN_ENCRYPTED = "id_token_encrypted"
    ID_TOKEN_BAD_ALG = "id_token_bad_alg"
    ID_TOKEN_BAD_HEADER = "id_token_bad_header"
    ID_TOKEN_BAD_TYP = "id_token_bad_typ"
    ID_TOKEN_UNKNOWN_KEY = "id_token_unknown_key"
    ID_TOKEN_BAD_SIGNATURE = "id_token_bad_signature"
    ID_TOKEN_PAYLOAD_INVALID_JSON = "id_token_payload_invalid_json"
    ID_TOKEN_BAD_ISS = "id_token_bad_iss"
    ID_TOKEN_BAD_AUD = "id_token_bad_aud"
    ID_TOKEN_BAD_AZP = "id_token_bad_azp"
    ID_TOKEN_NO_EXP = "id_token_no_exp"
    ID_TOKEN_BAD_EXP = "id_token_bad_exp"
    ID_TOKEN_EXPIRED = "id_token_expired"
    ID_TOKEN_NO_IAT = "id_token_no_iat"
    ID_TOKEN_BAD_IAT = "id_token_bad_iat"
    ID_TOKEN_TOO_OLD = "id_token_too_old"
    ID_TOKEN_BAD_NBF = "id_token_bad_nbf"
    ID_TOKEN_BAD_NONCE = "id_token_bad_nonce"
    ID_TOKEN_BAD_SUB = "id_token_bad_sub"
    ID_TOKEN_BAD_AT_HASH = "id_token_bad_at_hash"

    # logout_token: identity.tokens on a back-channel logout token
    LOGOUT_TOKEN_TOO_LARGE = "logout_token_too_large"
    LOGOUT_TOKEN_MALFORMED = "logout_token_malformed"
    LOGOUT_TOKEN_ENCRYPTED = "logout_token_encrypted"
    LOGOUT_TOKEN_BAD_ALG = "logout_token_bad_alg"
    LOGOUT_TOKEN_BAD_HEADER = "logout_token_bad_header"
    LOGOUT_TOKEN_BAD_TYP = "logout_token_bad_typ"
    LOGOUT_TOKEN_UNKNOWN_KEY = "logout_token_unknown_key"
    LOGOUT_TOKEN_BAD_SIGNATURE = "logout_token_bad_signature"
    LOGOUT_TOKEN_PAYLOAD_INVALID_JSON = "logout_token_payload_invalid_json"
    LOGOUT_TOKEN_BAD_ISS = "logout_token_bad_iss"
    LOGOUT_TOKEN_BAD_AUD = "logout_token_bad_aud"
    LOGOUT_TOKEN_NO_EXP = "logout_token_no_exp"
    LOGOUT_TOKEN_BAD_EXP = "logout_token_bad_exp"
    LOGOUT_TOKEN_EXPIRED = "logout_token_expired"
    LOGOUT_TOKEN_NO_IAT = "logout_token_no_iat"
    LOGOUT_TOKEN_BAD_IAT = "logout_token_bad_iat"
    LOGOUT_TOKEN_NO_JTI = "logout_token_no_jti"
    LOGOUT_TOKEN_BAD_EVENTS = "logout_token_bad_events"
    LOGOUT_TOKEN_HAS_NONCE = "logout_token_has_nonce"
    LOGOUT_TOKEN_NO_SUBJECT = "logout_token_no_subject"
    LOGOUT_TOKEN_BAD_SUB = "logout_token_bad_sub"
    LOGOUT_TOKEN_BAD_SID = "logout_token_bad_sid"

    # logout: the logout endpoint and back-channel logout
    LOGOUT = "logout"
    LOGOUT_CONFIRM = "logout_confirm"
    BACKCHANNEL_LOGOUT = "backchannel_logout"
    BACKCHANNEL_REPLAYED = "backchannel_replayed"
    BACKCHANNEL_METHOD = "backchannel_method"
    BACKCHANNEL_CONTENT_TYPE = "backchannel_content_type"
    BACKCHANNEL_TOO_LARGE = "backchannel_too_large"
    BACKCHANNEL_MALFORMED = "backchannel_malformed"
    BACKCHANNEL_NO_TOKEN = "backchannel_no_token"
    BACKCHANNEL_RATE = "backchannel_rate"

    # upstream: forwarding to the app (UpstreamError), and the request's own end
    UPSTREAM_CONNECT = "upstream_connect"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_PROTOCOL = "upstream_protocol"
    UPSTREAM_RESET = "upstream_reset"
    UPSTREAM_BODY_TOO_LARGE = "upstream_body_too_large"
    UPSTREAM_WEBSOCKET_REFUSED = "upstream_websocket_refused"
    CLIENT_ABORTED = "client_aborted"
    INTERNAL_ERROR = "internal_error"

    # reload: the flow record each definitions reload leaves
    RELOAD_SUCCESS = "reload_success"
    RELOAD_LAST_KNOWN_GOOD = "reload_last_known_good"
    RELOAD_REJECTED = "reload_rejected"
    RELOAD_FAILED = "reload_failed"

    # operator: start-up and operations, never a request
    CERTIFICATE_ERROR = "certificate_error"
    SOURCE_UNAVAILABLE = "source_unavailable"
    REDIRECT_ERROR = "redirect_error"
    CONFIG_INVALID = "config_invalid"
    PORTS_BLOCKED = "ports_blocked"
    PORTS_UNBLOCKED = "ports_unblocked"

    # a flow record nobody filled in
    UNFINISHED = "unfinished"


class Outcome(enum.StrEnum):
    """A flow record's ``decision``: what the enforcer did with the request."""

    ALLOW = "allow"
    """Forwarded to the app."""
    DENY = "deny"
    """Refused by the policy (403)."""
    LOGIN = "login"
    """Sent to sign in (302 to the IdP, or 401 for API clients)."""
    CALLBACK = "callback"
    """The login callback: a session was made, or the login failed."""
    LOGOUT = "logout"
    """The logout or back-channel logout endpoint."""
    BAD_REQUEST = "bad_request"
    """Refused before any policy: framing, routing or the request-target."""
    ERROR = "error"
    """The enforcer, the IdP, the session store or the app failed."""
    RELOAD = "reload"
    """Not a request: a definitions reload."""
    LIFECYCLE = "lifecycle"
    """Not a request: the protected ports were blocked or opened while no enforcer serves them
    (boot, stop, ``enforcer unblock``)."""



class UpstreamKind(enum.StrEnum):
    """What went wrong with the app; the ``kind`` label of ``enforcer_upstream_errors``."""

    CONNECT = "connect"
    TIMEOUT = "timeout"
    PROTOCOL = "protocol"
    RESET = "reset"
    BODY_TOO_LARGE = "body_too_large"
    WEBSOCKET_REFUSED = "websocket_refused"


UPSTREAM_REASONS: dict[UpstreamKind, Reason] = {
    UpstreamKind.CONNECT: Reason.UPSTREAM_CONNECT,
    UpstreamKind.TIMEOUT: Reason.UPSTREAM_TIMEOUT,
    UpstreamKind.PROTOCOL: Reason.UPSTREAM_PROTOCOL,
    UpstreamKind.RESET: Reason.UPSTREAM_RESET,
    UpstreamKind.BODY_TOO_LARGE: Reason.UPSTREAM_BODY_TOO_LARGE,
    UpstreamKind.WEBSOCKET_REFUSED: Reason.UPSTREAM_WEBSOCKET_REFUSED,
}
"""The flow reason (and page code) of each upstream failure kind."""


class EnforcerError(Exception):
    """A refusal or failure with its reason code and the HTTP status the client gets."""

    reason: Reason
    status: int

    def __init__(self, reason: Reason, status: int, message: str = "") -> None:
        self.reason = reason
        self.status = status
        super().__init__(message or reason.value)


class UpstreamError(EnforcerError):
    """The app could not be reached or answered garbage; ``kind`` labels the metric."""

    kind: UpstreamKind

    def __init__(self, kind: UpstreamKind | str, status: int) -> None:
        # str: callers in http/ still pass the bare kind; UpstreamKind() refuses any other text
        self.kind = UpstreamKind(kind)
        super().__init__(UPSTREAM_REASONS[self.kind], status, self.kind.value)


class ClientBodyError(EnforcerError):
    """A request body the enforcer stopped reading: it came in below ``limits.bodyMinRate``
    (``body_too_slow``, 408) or its address has too many uploads open (``too_many_uploads``,
    429).  Set on the body stream by :mod:`enforcer.http.server`, so whoever reads it raises."""


class ClientReadError(ClientBodyError):
    """A client that took the enforcer's answer below ``limits.readMinRate`` bytes a second
    once ``limits.readGrace`` had passed (``read_too_slow``, 408): its connection was cut by
    :class:`enforcer.http.upstream.WriteDeadline`.  A :class:`ClientBodyError`, so it is
    recorded like the other cuts of a too-slow client (decision kept, connection closed)."""
