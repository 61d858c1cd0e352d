"""The one exception type for mistakes a user can fix, and keeping credentials out of messages.

`UserError` carries a message written for people: what was given, what was expected, and
what to do. The CLI prints it without a traceback and exits with status 2; the Python API
lets it propagate. It subclasses ValueError so callers that catch ValueError keep working.

`redact(text, secrets)` is for anything a server sent us that we print (an error body, a URL):
servers echo the caller's Authorization header or key back more often than one would think, and
a message ends up in logs, CI output and bug reports.
"""

import re
from urllib.parse import quote

_REDACTED = "[redacted]"
# Note: What counts as a credential
# The caller's own secrets (the API key it sent), wherever and however quoted; the values of
# Authorization-like headers and of fields named like keys (api_key, access_token, secret,
# password, x-api-key) in JSON, headers and query strings; the password in a URL's user:password@;
# and tokens in the well-known key shapes (OpenAI/Anthropic sk-, Hugging Face hf_, GitHub gh*_,
# AWS AKIA, Slack xox*-, Google AIza). Field names are matched whole, so "max_tokens": 512 stays.
_PATTERNS = [
    (re.compile(r"(?i)\b((?:proxy-)?authorization\s*[:=]\s*[\"']?)(?:(bearer|basic|token)\s+)?[^\s\"',;]+"),
     lambda m: m[1] + (m[2] + " " if m[2] else "") + _REDACTED),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{6,}"), lambda m: m[1] + _REDACTED),
    (re.compile(r"(?i)([\"']?\b(?:api[_-]?key|x-api-key|access[_-]?token|refresh[_-]?token|token|secret|"
                r"client[_-]?secret|password)[\"']?\s*[:=]\s*[\"']?)[^\s\"',&}]{4,}"), lambda m: m[1] + _REDACTED),
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/\s:@]+:)[^/\s@]+(@)"), lambda m: m[1] + _REDACTED + m[2]),
    (re.compile(r"\b(?:sk-[A-Za-z0-9_-]{16,}|hf_[A-Za-z0-9]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}|"
                r"xox[abprs]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})"), lambda m: _REDACTED),
]


class UserError(ValueError):
    """Bad input from the user: the message says what was found, what was expected, the fix."""


def redact(text: str, secrets=()) -> str:
    """`text` with credentials replaced by "[redacted]" (see Note: What counts as a credential).

    secrets: strings the caller knows are secret (None and strings shorter than 4 characters are
    ignored: redacting "a" everywhere would only destroy the message)."""
    for secret in sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True):
        for form in {secret, quote(secret, safe=""), quote(secret, safe="").replace("-", "%2D")}:
            text = text.replace(form, _REDACTED)
    for pattern, replace in _PATTERNS:
        text = pattern.sub(replace, text)
    return text
