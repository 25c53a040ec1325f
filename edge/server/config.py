"""Server settings and the checks that guard them (loopback binding, API key)."""

from __future__ import annotations

import hmac
import math
import ipaddress
import logging
from dataclasses import dataclass

from edge.errors import ConfigError
from edge.server.protocol import DEFAULT_MAX_TOKENS, MAX_TOKENS_LIMIT, REASONING_FORMATS, Limits
from edge.templates import TemplateLimits

log = logging.getLogger("edge.server")

LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


@dataclass
class ServerConfig:
    """How ``edge-reason serve`` runs. Defaults are safe for a desktop app: loopback only.
    The server's limits are set here and nowhere else (``serve``'s options take these defaults)."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    model_id: str | None = None
    reasoning_format: str = REASONING_FORMATS[0]
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0  # the whole request body must arrive within this (else 408)
    max_tokens_limit: int = MAX_TOKENS_LIMIT
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    max_queue: int = 8
    retry_after_s: int = 1
    log_level: str = "info"
    template_timeout_s: float | None = None  # per chat-template render; None: the Runtime's (2 s)
    template_max_chars: int | None = None  # prompt characters a render may produce; None: the Runtime's (4 Mi)

    def __post_init__(self) -> None:
        if self.reasoning_format not in REASONING_FORMATS:
            raise ConfigError(f"unknown reasoning format {self.reasoning_format!r}; choose one of: {', '.join(REASONING_FORMATS)}")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1024:
            raise ConfigError(f"the body limit must be >= 1024 bytes, got {self.max_body_bytes}")
        if not 0 < self.body_timeout_s < math.inf:
            raise ConfigError(f"the body timeout must be a finite number of seconds > 0, got {self.body_timeout_s}")
        if self.max_tokens_limit < 1:
            raise ConfigError(f"the max_tokens limit must be >= 1, got {self.max_tokens_limit}")
        if self.default_max_tokens < 1:
            raise ConfigError(f"the default max_tokens must be >= 1, got {self.default_max_tokens}")
        if self.max_queue < 0:
            raise ConfigError(f"the queue size must be >= 0, got {self.max_queue}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty; give a non-empty key or none")
        self.template_limits(TemplateLimits())  # validates the two template limits

    def template_limits(self, base: TemplateLimits) -> TemplateLimits:
        """The chat-template budget of a request: these settings over ``base`` (the Runtime's)."""
        return TemplateLimits(
            base.timeout_s if self.template_timeout_s is None else self.template_timeout_s,
            base.max_chars if self.template_max_chars is None else self.template_max_chars,
        )

    @property
    def limits(self) -> Limits:
        return Limits(self.max_tokens_limit, min(self.default_max_tokens, self.max_tokens_limit), self.reasoning_format)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    h = host.strip().strip("[]").lower()
    if h in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning for a bind that other machines can reach without an API key, else None."""
    if is_loopback(host) or api_key:
        return None
    return (
        f"SECURITY WARNING: serving on {host}, reachable from other machines, WITHOUT an API key: "
        "anyone on the network can use this model. Bind 127.0.0.1 (the default) or pass --api-key."
    )


def warn_if_exposed(host: str, api_key: str | None, logger: logging.Logger = log) -> bool:
    """Log :func:`exposure_warning` loudly (a banner at WARNING level); True if it warned."""
    msg = exposure_warning(host, api_key)
    if msg is None:
        return False
    bar = "!" * min(len(msg), 100)
    logger.warning("\n%s\n%s\n%s", bar, msg, bar)
    return True


def key_matches(authorization: str | None, api_key: str) -> bool:
    """Check an ``Authorization: Bearer KEY`` header in constant time."""
    given = ""
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer":
            given = value.strip()
    return hmac.compare_digest(given.encode("utf-8"), api_key.encode("utf-8"))
