"""POST a JSON summary of a run's changes to the monitor's webhook.

The body is signed, not carried: with ``webhook.secret_env`` set, the header
``X-Rsflow-Signature-256: sha256=<hex>`` holds the HMAC-SHA256 of the exact body bytes under the
secret (the scheme GitHub webhooks use), so a receiver that knows the secret can check the sender
and the body while the secret itself never travels. The secret is read from the environment at call
time and kept in no object, log line, file or manifest; logs and records name the URL by its scheme and
host only (:func:`~rsflow.monitor.config._redact_url`: hook URLs carry their token in the path).

Delivery: up to ``attempts`` tries with backoff on connection errors, answers that are not HTTP and HTTP
429/5xx. A webhook that keeps failing does not fail the run (it is called after the commit: raising there
would fail a run whose items are committed, and every later run that owes the same changes); the failure is
logged and recorded in the run's ``last_run.json``.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from rsflow.monitor.config import WebhookConfig, _redact_url

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Rsflow-Signature-256"
_RETRY_STATUS = (429, 500, 502, 503, 504)


@dataclass(frozen=True)
class WebhookResult:
    """How a webhook call went."""

    delivered: bool
    status: int | None
    """Last HTTP status (None when no response came)."""
    attempts: int
    error: str | None = None


def sign(body: bytes, secret: str) -> str:
    """The signature header value for ``body`` under ``secret``: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed: urllib turns a redirected POST into a GET without its body, which the
    receiver answers with 200 while the summary never arrived."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        return None


def send_webhook(
    config: WebhookConfig, payload: dict[str, Any], *, attempts: int = 3, backoff_seconds: float = 1.0
) -> WebhookResult:
    """POST ``payload`` as JSON to ``config.url`` (signed when ``config.secret_env`` is set).

    Returns:
        A :class:`WebhookResult`; never raises: whatever goes wrong in the delivery (a receiver that does
        not answer HTTP, a URL urllib refuses, anything else) is a failed result with the reason.
    """
    body = json.dumps(payload, sort_keys=True, default=str).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "rsflow-monitor"}
    if config.secret_env:
        secret = os.environ.get(config.secret_env)
        if not secret:
            logger.error("webhook not called: the environment variable %s is not set", config.secret_env)
            return WebhookResult(
                delivered=False, status=None, attempts=0, error=f"{config.secret_env} is not set"
            )
        headers[SIGNATURE_HEADER] = sign(body, secret)
        del secret
    where = _redact_url(config.url)
    status: int | None = None
    error: str | None = None
    opener = urllib.request.build_opener(_NoRedirect)
    for attempt in range(1, attempts + 1):
        try:
            request = urllib.request.Request(config.url, data=body, headers=headers, method="POST")
            with opener.open(request, timeout=config.timeout_seconds) as response:
                status = int(response.status)
            if not 200 <= status < 300:
                error = f"HTTP {status}"
                break
            logger.info("webhook %s answered HTTP %d", where, status)
            return WebhookResult(delivered=True, status=status, attempts=attempt)
        except urllib.error.HTTPError as exc:
            status, error = exc.code, f"HTTP {exc.code}"
            if 300 <= exc.code < 400:
                error += f" (a redirect to {_redact_url(exc.headers.get('Location') or '?')}: give that URL)"
                break
            if exc.code not in _RETRY_STATUS:
                break
        except (urllib.error.URLError, OSError) as exc:
            status, error = None, _reason(exc, getattr(exc, "reason", exc), config.url)
        except (http.client.InvalidURL, ValueError) as exc:  # the URL (a bad port, a space): no use retrying
            status, error = None, _reason(exc, exc, config.url)
            break
        except http.client.HTTPException as exc:  # an answer that is not HTTP (BadStatusLine, IncompleteRead)
            status, error = None, _reason(exc, exc, config.url)
        except Exception as exc:  # noqa: BLE001 - the run is committed: nothing here may fail it
            status, error = None, _reason(exc, exc, config.url)
            break
        if attempt < attempts:
            time.sleep(backoff_seconds * 2 ** (attempt - 1))
    logger.error("webhook %s failed after %d attempt(s): %s", where, attempt, error)
    return WebhookResult(delivered=False, status=status, attempts=attempt, error=error)


def _reason(exc: BaseException, detail: object, url: str) -> str:
    """``Type: detail`` for the result and the log, with the URL's path and query taken out (urllib's
    messages quote them, and hook URLs carry their token there), and its ``user:password@`` too (the config
    refuses one, but http.client quoted it: ``nonnumeric port: 'password@host'``); then
    :func:`rsflow.hrefs.redact` for any other URL credentials in the text. The result goes to the log,
    ``last_run.json`` and the CLI's output."""
    from urllib.parse import urlsplit

    from rsflow.hrefs import redact

    text = f"{type(exc).__name__}: {detail}"
    credentials: set[str] = set()
    try:
        parts = urlsplit(url)
        pieces = {url, url[len(f"{parts.scheme}://{parts.netloc}"):], parts.path, parts.query}
        if "@" in parts.netloc:
            userinfo = parts.netloc.rsplit("@", 1)[0]
            credentials = {userinfo, *userinfo.split(":", 1), parts.username or "", parts.password or ""}
    except ValueError:  # a broken [IPv6] host: the URL as a whole, then
        pieces = {url}
    for secret in sorted(pieces, key=len, reverse=True):
        if len(secret) > 1:
            text = text.replace(secret, "<path>")
    for secret in sorted(credentials, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "<credentials>")
    return redact(" ".join(text.split()))[:500]
