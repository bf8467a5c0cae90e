"""A task's label list from an LLM, once (DISCOVER Algorithm 1): the client behind ``latentcast task new``.

::

    task name + description ─► Algorithm 1 prompt ─► POST {url}/chat/completions ─► labels ─► TaskList
        ─► $LATENTCAST_CACHE/tasks/<name>.json (edge/tasks.py), which the edge grounds (``--task``)

The LLM is any OpenAI-compatible chat endpoint (``POST {url}/chat/completions``; OpenAI, vLLM,
llama.cpp server, Ollama's ``/v1``, LiteLLM ...), set by :class:`LlmConfig`: defaults < a YAML file
(``--config``) < ``LATENTCAST_LLM__<KEY>`` variables < command-line flags. The API key is read from
the environment variable named by ``api_key_env`` (default ``OPENAI_API_KEY``) at request time; it
is sent only as the ``Authorization: Bearer`` header and never written to a file or a message.

The answer must hold a JSON array of strings (a fenced ```json block, a JSON object with one list,
or a numbered / bulleted / comma-separated list are tolerated). Any failure (refusal, HTTP error,
timeout, unreachable host, malformed or too short answer) raises :class:`LabelGenerationError` with
the reason, and the cached list, if any, is left as it was; a new list is written atomically.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from latentcast.config import load_config
from latentcast.edge.tasks import TaskError, TaskList, TaskSource, check_task_name, normalize_labels, save_task, utc_now

log = logging.getLogger(__name__)

__all__ = ["PROMPT_VERSION", "PROMPT_TEMPLATE", "ENV_PREFIX", "LlmConfig", "LabelGenerationError",
           "load_llm_config", "render_prompt", "task_phrase", "chat_completion", "parse_labels", "generate_task",
           "endpoint_host", "safe_url"]

ENV_PREFIX = "LATENTCAST_LLM"
PROMPT_VERSION = "discover-alg1-v1"  # bump when PROMPT_TEMPLATE changes: cached lists record it
# DISCOVER, Algorithm 1 "Prompt for labels generation", verbatim; then one line on the answer format
PROMPT_TEMPLATE = """\
1. Suppose you are an AI assistant and now need to generate task-related object labels based on the task.
2. The number of labels should not be fewer than 100, and the labels should cover a wide range of categories \
while maintaining appropriate granularity.
3. First, you should determine the granularity required by the task, and then generate the corresponding labels.
4. For example:
   - For some tasks, something that can't be detected, such as the sky or rivers, shouldn't be included as labels.
   - For some tasks, it is necessary to include more comprehensive information about the image, and it needs \
overly general categories.
5. I am working on the {Task} and need a representative label list.
6. The task description is as {Task Description}.

Answer with only a JSON array of strings, one label per element (for example ["car", "traffic light"]), \
with no numbering, comments or other text."""

MAX_RESPONSE_BYTES = 4 * 1024 * 1024
_QUOTE_CHARS = 160

class LabelGenerationError(RuntimeError):
    """The LLM gave no usable label list; the message says why (never the API key)."""


@dataclass
class LlmConfig:
    url: str = "https://api.openai.com/v1"  # OpenAI-compatible API base: POST {url}/chat/completions
    model: str = "gpt-4o"  # model name sent in the request (DISCOVER used ChatGPT-4o)
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the API key (unset: no Authorization
    # header, e.g. a local server); the key itself is never read from or written to a file
    timeout_s: float = 60.0  # seconds to wait for the connection and for each read of the answer
    temperature: float = 0.0  # sampling temperature (0: as repeatable as the endpoint allows)
    max_tokens: int = 0  # answer length limit sent to the endpoint; 0 = not sent (the endpoint's default)
    min_labels: int = 20  # an answer with fewer labels is an error (the prompt asks for at least 100)

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"llm url {safe_url(self.url)!r} must be an http(s) URL such as "
                             "https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
        if parts.username or parts.password or parts.query or parts.fragment:
            raise ValueError(f"llm url {safe_url(self.url)!r}: user info, a query or a fragment are not allowed in "
                             "the url (keys belong in the environment variable named by api_key_env)")
        if not self.model.strip():
            raise ValueError("llm model is empty: name the model to ask (e.g. gpt-4o)")
        if self.timeout_s <= 0:
            raise ValueError(f"llm timeout_s {self.timeout_s!r} must be > 0")
        if self.max_tokens < 0:
            raise ValueError(f"llm max_tokens {self.max_tokens!r} must be >= 0")
        if self.min_labels < 1:
            raise ValueError(f"llm min_labels {self.min_labels!r} must be >= 1")


def load_llm_config(path: str | os.PathLike | None = None, *, env: Mapping[str, str] | None = None) -> LlmConfig:
    """``load_config(LlmConfig, path, env_prefix="LATENTCAST_LLM")``."""
    return load_config(LlmConfig, path, env_prefix=ENV_PREFIX, env=env)


# ---------------------------------------------------------------------- prompt


def task_phrase(name: str) -> str:
    """The ``{Task}`` of the prompt for a task name: ``people-counting`` -> ``people counting task``."""
    words = " ".join(re.split(r"[-_]+", name)).strip()
    return words if words.endswith(" task") or words == "task" else f"{words} task"


def render_prompt(task: str, description: str) -> str:
    """Algorithm 1 with ``{Task}`` and ``{Task Description}`` filled in."""
    desc = " ".join(description.split()).rstrip(".")
    return PROMPT_TEMPLATE.replace("{Task}", task.strip()).replace("{Task Description}", desc)


# ---------------------------------------------------------------------- HTTP client


def safe_url(url: str) -> str:
    """``url`` without user info, query or fragment (they may hold credentials)."""
    try:
        p = urllib.parse.urlsplit(url)
        netloc = p.hostname or ""
        if ":" in netloc:
            netloc = f"[{netloc}]"
        if p.port:
            netloc += f":{p.port}"
        return urllib.parse.urlunsplit((p.scheme, netloc, p.path, "", ""))
    except ValueError:
        return "<unparseable URL>"


def endpoint_host(url: str) -> str:
    """``host[:port]`` of an endpoint URL (what a task file records as its source)."""
    p = urllib.parse.urlsplit(url)
    host = p.hostname or "unknown"
    return f"{host}:{p.port}" if p.port else host


def _quote(text: str) -> str:
    t = " ".join(str(text).split())
    return repr(t[:_QUOTE_CHARS] + ("..." if len(t) > _QUOTE_CHARS else ""))


def _server_message(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        return _quote(text) if text else "(empty body)"
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or err.get("code")
            if msg:
                return _quote(msg)
        elif isinstance(err, str):
            return _quote(err)
        for k in ("message", "detail"):
            if isinstance(obj.get(k), str):
                return _quote(obj[k])
    return _quote(text)


def _hint(status: int, key_env: str, has_key: bool) -> str:
    if status in (401, 403):
        return (f" (check the API key in ${key_env})" if has_key else
                f" (no API key was sent: set ${key_env}, or api_key_env / {ENV_PREFIX}__API_KEY_ENV)")
    if status == 404:
        return " (check the url: it should end at the API base, e.g. .../v1, and the model name)"
    if status == 429:
        return " (rate limited or out of quota: retry later)"
    if status >= 500:
        return " (server error: retry later)"
    return ""


def chat_completion(cfg: LlmConfig, messages: Sequence[Mapping[str, str]], *,
                    env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """POST one chat completion; returns (answer text, the model name the endpoint reports)."""
    env = os.environ if env is None else env
    url = cfg.url.rstrip("/") + "/chat/completions"
    shown = safe_url(url)
    body: dict[str, Any] = {"model": cfg.model, "messages": [dict(m) for m in messages],
                            "temperature": cfg.temperature}
    if cfg.max_tokens:
        body["max_tokens"] = cfg.max_tokens
    headers = {"Content-Type": "application/json", "Accept": "application/json",
               "User-Agent": "latentcast-task/1"}
    key = env.get(cfg.api_key_env, "").strip() if cfg.api_key_env else ""
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode("utf-8"), headers=headers, method="POST")
    timeout_msg = (f"no answer from {shown} within {cfg.timeout_s:g} s (raise timeout_s, --timeout or "
                   f"{ENV_PREFIX}__TIMEOUT_S)")
    try:
        with urllib.request.urlopen(req, timeout=cfg.timeout_s) as resp:
            raw = resp.read(MAX_RESPONSE_BYTES + 1)
    except urllib.error.HTTPError as exc:
        try:
            detail = _server_message(exc.read(64 * 1024))
        except (OSError, http.client.HTTPException):
            detail = "(no body)"
        raise LabelGenerationError(f"{shown} refused the request: HTTP {exc.code} {exc.reason}: {detail}"
                                   f"{_hint(exc.code, cfg.api_key_env, bool(key))}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (TimeoutError, socket.timeout)):
            raise LabelGenerationError(timeout_msg) from None
        if isinstance(reason, ConnectionRefusedError):
            raise LabelGenerationError(f"cannot connect to {shown}: connection refused (is the server running? "
                                       "check url / --url)") from None
        raise LabelGenerationError(f"cannot reach {shown}: {reason}") from None
    except TimeoutError:
        raise LabelGenerationError(timeout_msg) from None
    except (OSError, http.client.HTTPException) as exc:
        raise LabelGenerationError(f"the connection to {shown} failed: {type(exc).__name__}: {exc}") from None
    if len(raw) > MAX_RESPONSE_BYTES:
        raise LabelGenerationError(f"{shown} answered more than {MAX_RESPONSE_BYTES} bytes: not a label list")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise LabelGenerationError(f"{shown} did not answer with an OpenAI-compatible chat completion (not JSON): "
                                   f"{_quote(raw.decode('utf-8', 'replace'))}") from None
    try:
        choice = obj["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError):
        raise LabelGenerationError(f"{shown} answered JSON without choices[0].message (not an OpenAI-compatible "
                                   f"chat completion): {_quote(json.dumps(obj)[:400])}") from None
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if not isinstance(content, str) or not content.strip():
        refusal = message.get("refusal") if isinstance(message, dict) else None
        if refusal:
            raise LabelGenerationError(f"the model refused: {_quote(refusal)}")
        raise LabelGenerationError(f"{shown} answered an empty message (finish_reason "
                                   f"{choice.get('finish_reason')!r})")
    if choice.get("finish_reason") == "length":
        raise LabelGenerationError(f"the answer was cut off at the length limit (finish_reason 'length'; raise "
                                   f"max_tokens): {_quote(content)}")
    model = obj.get("model") if isinstance(obj.get("model"), str) and obj.get("model").strip() else cfg.model
    return content, model


# ---------------------------------------------------------------------- answer parsing

_FENCE = re.compile(r"```[ \t]*[A-Za-z0-9_+-]*[ \t]*\n(.*?)(?:```|\Z)", re.S)
_BULLET = re.compile(r"^\s*(?:[-*\u2022+]|\(?\d{1,4}[.):])\s+(.+?)\s*$")


def _json_items(text: str) -> list | None:
    for cand in (text, text[text.find("["): text.rfind("]") + 1] if "[" in text and "]" in text else ""):
        if not cand.strip():
            continue
        try:
            obj = json.loads(cand)
        except ValueError:
            continue
        if isinstance(obj, dict):  # {"labels": [...]} from endpoints in JSON mode
            lists = [v for v in obj.values() if isinstance(v, list)]
            obj = lists[0] if len(lists) == 1 else None
        if isinstance(obj, list):
            return obj
    return None


def _clean(item: str) -> str:
    return item.strip().strip("`\"'\u201c\u201d\u2018\u2019").strip().rstrip(".,;:").strip()


def _list_items(text: str) -> list[str]:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    bullets = [m.group(1) for m in map(_BULLET.match, lines) if m]
    if len(bullets) >= 3:
        items = bullets
    else:
        items = re.split(r"[,;\n]", text)
    out = []
    for it in items:
        it = _clean(it)
        if it and len(it) <= 64 and len(it.split()) <= 8:  # longer items are prose, not labels
            out.append(it)
    return out


def parse_labels(text: str, *, min_labels: int = 20) -> list[str]:
    """The labels in an LLM answer, normalised (stripped, lower case, de-duplicated)."""
    if not isinstance(text, str) or not text.strip():
        raise LabelGenerationError("the answer is empty")
    m = _FENCE.search(text)
    body = m.group(1) if m else text
    items = _json_items(body)
    if items is not None:
        bad = [i for i, x in enumerate(items) if not isinstance(x, str)]
        if bad:
            raise LabelGenerationError(f"the answer's JSON array holds non-string item(s) at {bad[:5]} (expected "
                                       f"an array of label strings): {_quote(text)}")
        items = [_clean(x) for x in items]
        items = [x for x in items if x]
    else:
        items = _list_items(body)
    try:
        labels = list(normalize_labels(items, where="answer")) if items else []
    except TaskError as exc:
        raise LabelGenerationError(f"{exc}: {_quote(text)}") from None
    if len(labels) < min_labels:
        raise LabelGenerationError(f"the answer holds {len(labels)} label(s), fewer than {min_labels} (expected a "
                                   f"JSON array of 100+ label strings); it begins: {_quote(text)}")
    return labels


# ---------------------------------------------------------------------- generation


def generate_task(name: str, description: str, cfg: LlmConfig | None = None, *, task: str | None = None,
                  env: Mapping[str, str] | None = None, directory: str | os.PathLike | None = None) -> TaskList:
    """Ask the LLM once for ``name``'s labels (Algorithm 1, ``{Task}`` = ``task`` or :func:`task_phrase`)
    and cache the list (``directory``, default ``$LATENTCAST_CACHE/tasks``). On any error nothing is written."""
    check_task_name(name)
    if not isinstance(description, str) or not description.strip():
        raise TaskError("the task description is empty: say what the task is, e.g. "
                        "--description 'count vehicles and cyclists at an intersection'")
    cfg = cfg if cfg is not None else load_llm_config(env=env)
    prompt = render_prompt(task or task_phrase(name), description)
    content, model = chat_completion(cfg, [{"role": "user", "content": prompt}], env=env)
    labels = parse_labels(content, min_labels=cfg.min_labels)
    tl = TaskList(name=name, description=" ".join(description.split()), labels=tuple(labels),
                  source=TaskSource(kind="llm", model=model, prompt_version=PROMPT_VERSION,
                                    endpoint=endpoint_host(cfg.url), created=utc_now()))
    save_task(tl, directory)
    return tl
