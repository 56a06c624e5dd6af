"""The error hierarchy.

Every error carries a machine-readable ``code`` that a reply puts in ``error.code``, and an ``exit_code`` the
process ends with when the error stops it at start-up. The exit codes follow ``sysexits.h`` where one fits; the
systemd unit lists the start-up ones in ``RestartPreventExitStatus`` so a bad config or model is not restarted in
a loop. A generation that stops early is not an exception: its reply carries ``cancelled`` or ``timeout`` with the
text generated so far; refusals carry the guard's reason code.
"""

from __future__ import annotations


class EdgeError(Exception):
    """Base of every error the daemon raises on purpose."""

    code = "internal"
    exit_code = 70  # EX_SOFTWARE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(EdgeError):
    """The configuration file or a hardware profile is invalid; the message names the key."""

    code = "config_invalid"
    exit_code = 78  # EX_CONFIG


class ModelError(EdgeError):
    """Base of the model-file errors."""

    code = "model_error"
    exit_code = 65


class ModelCorruptError(ModelError):
    """A file is not a readable GGUF model: wrong magic, truncated, or a header that does not parse."""

    code = "model_corrupt"
    exit_code = 65  # EX_DATAERR


class ModelMissingError(ModelError):
    """No model file where one was expected."""

    code = "model_missing"
    exit_code = 66  # EX_NOINPUT


class ModelChecksumError(ModelError):
    """A model file's SHA-256 differs from the expected one."""

    code = "model_checksum"
    exit_code = 67


class ModelTooLargeError(ModelError):
    """No model file fits the memory budget, even with the smallest context."""

    code = "model_too_large"
    exit_code = 69  # EX_UNAVAILABLE


class InternalError(EdgeError):
    """An unexpected fault while serving one request: the request gets this reply, the daemon keeps serving."""

    code = "internal"


class VoiceError(EdgeError):
    """A voice device or model is missing or unusable; the rest of the daemon keeps serving."""

    code = "voice_unavailable"
    exit_code = 69  # EX_UNAVAILABLE


class AskError(EdgeError):
    """``edge-assistant ask``: the broker could not be reached or no reply came in time."""

    code = "ask_failed"
    exit_code = 69


class KnowledgeError(EdgeError):
    """The knowledge index cannot be opened or written (the documents themselves are skipped one by one)."""

    code = "knowledge_unavailable"
    exit_code = 74  # EX_IOERR


class StartTimeoutError(EdgeError):
    """A start-up step (choosing, loading or indexing) did not end within ``limits.start_timeout_s``.

    Not listed in the unit's ``RestartPreventExitStatus``: a hang may be passing (a slow disk, a stuck mount), so
    systemd restarts the service.
    """

    code = "start_timeout"
    exit_code = 75  # EX_TEMPFAIL


class BrokerAuthError(EdgeError):
    """The broker refused the credentials, or the password could not be read."""

    code = "broker_auth"
    exit_code = 77  # EX_NOPERM


class RequestError(EdgeError):
    """Base of the errors that answer one request and leave the daemon serving."""

    code = "bad_request"
    exit_code = 64


class BadRequestError(RequestError):
    """The request is malformed: bad JSON, bad UTF-8, a wrong type, an unknown field."""

    code = "bad_request"


class PayloadTooLargeError(RequestError):
    """The payload is larger than the configured limit; it was not parsed."""

    code = "payload_too_large"


class UnknownPersonaError(RequestError):
    """The request names a persona that the configuration does not define."""

    code = "unknown_persona"


class ContextOverflowError(RequestError):
    """The prompt does not fit the context window; nothing was generated."""

    code = "context_overflow"


class BusyError(RequestError):
    """The request queue is full."""

    code = "busy"


class ShuttingDownError(RequestError):
    """The daemon is stopping and will not serve this request."""

    code = "shutting_down"


class ExpiredError(RequestError):
    """The request's MQTT Message Expiry passed before it was served; the client has stopped waiting."""

    code = "expired"


class ForbiddenTopicError(RequestError):
    """The response topic lies outside the allowed prefix, or is one of the daemons' own topics."""

    code = "forbidden_topic"
