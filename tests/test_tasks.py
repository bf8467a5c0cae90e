"""Task label lists: files and lookup, the LLM client (real urllib against a fake OpenAI-compatible
server on 127.0.0.1), the `latentcast task` command, lenient label mapping + the Fig. 3 filter, and
`edge --task` putting the list's labels and hash into the session and packet headers."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from latentcast.detector import Detection
from latentcast.edge.grounding import Grounder, label_coverage, map_labels
from latentcast.edge.task_llm import (
    PROMPT_VERSION,
    LabelGenerationError,
    LlmConfig,
    generate_task,
    load_llm_config,
    parse_labels,
    render_prompt,
)
from latentcast.edge.tasks import (
    FORMAT,
    TaskError,
    TaskList,
    TaskSource,
    cache_dir,
    list_tasks,
    load_task,
    load_task_file,
    normalize_labels,
    save_task,
    shipped_dir,
)
from latentcast.proto.ids import label_set_hash
from latentcast.tools.task import COCO80

KEY = "sk-test-0123456789"
KEY_ENV = "LC_TEST_LLM_KEY"
DESC = "count vehicles and cyclists at an intersection"
GOOD = [f"label {i}" for i in range(30)] + ["Car", "car ", "School  Bus", "bicycle"]
SHIPPED = ("general-detection", "traffic", "people-counting", "retail", "classification")


# ---------------------------------------------------------------------- a fake OpenAI-compatible server


class FakeLlm:
    """``POST /v1/chat/completions`` on 127.0.0.1; ``mode`` picks the answer."""

    def __init__(self) -> None:
        self.mode = "good"
        self.requests: list[dict] = []
        self.release = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                outer.respond(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda *a: None  # a client that gave up (timeout test) closes the socket
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload, ctype: str = "application/json") -> None:
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    @staticmethod
    def completion(content: str, finish: str = "stop") -> dict:
        return {"id": "chatcmpl-1", "object": "chat.completion", "model": "fake-gpt-2026-01",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "finish_reason": finish}]}

    def respond(self, h: BaseHTTPRequestHandler) -> None:
        m = self.mode
        if m == "good":
            self._send(h, 200, self.completion(json.dumps(GOOD)))
        elif m == "fenced":
            self._send(h, 200, self.completion("Granularity: vehicle types.\n```json\n" + json.dumps(GOOD) + "\n```\n"))
        elif m == "numbered":
            self._send(
                h, 200, self.completion("Here you go:\n" + "\n".join(f"{i + 1}. {x}" for i, x in enumerate(GOOD)))
            )
        elif m == "malformed":
            self._send(h, 200, self.completion("I'm sorry, but I can't help with that request."))
        elif m == "not-json":
            self._send(h, 200, "<html>gateway says hi</html>", "text/html")
        elif m == "few":
            self._send(h, 200, self.completion(json.dumps(["car", "bus", "truck"])))
        elif m == "truncated":
            self._send(h, 200, self.completion('["car", "bus", "tru', finish="length"))
        elif m == "401":
            self._send(h, 401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
        elif m == "429":
            self._send(h, 429, {"error": {"message": "Rate limit reached"}})
        elif m == "500":
            self._send(h, 500, {"error": {"message": "The server had an error"}})
        elif m == "slow":
            self.release.wait(3.0)
            self._send(h, 200, self.completion(json.dumps(GOOD)))
        else:  # pragma: no cover
            raise AssertionError(m)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def llm():
    srv = FakeLlm()
    yield srv
    srv.close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTCAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(KEY_ENV, KEY)
    return tmp_path / "cache" / "tasks"


def cfg_for(srv: FakeLlm, **kw) -> LlmConfig:
    kw.setdefault("timeout_s", 5.0)
    return LlmConfig(url=srv.url, model="gpt-4o", api_key_env=KEY_ENV, **kw)


# ---------------------------------------------------------------------- the prompt and the client


def test_prompt_is_algorithm_1_with_task_and_description():
    p = render_prompt("traffic task", DESC + ".")
    assert p.startswith("1. Suppose you are an AI assistant and now need to generate task-related object labels "
                        "based on the task.\n2. The number of labels should not be fewer than 100,")
    assert "3. First, you should determine the granularity required by the task, and then generate" in p
    assert "something that can't be detected, such as the sky or rivers, shouldn't be included as labels." in p
    assert "5. I am working on the traffic task and need a representative label list." in p
    assert f"6. The task description is as {DESC}.\n" in p
    assert "JSON array of strings" in p and "{" not in p.replace('["car", "traffic light"]', "")


def test_good_answer_is_cached_with_its_source(llm, cache):
    tl = generate_task("traffic-lights", DESC, cfg_for(llm))
    path = cache / "traffic-lights.json"
    assert tl.path == path and path.is_file()
    assert tl.labels[:2] == ("label 0", "label 1") and tl.labels[-3:] == ("car", "school bus", "bicycle")
    assert len(tl.labels) == 33  # "Car" / "car " de-duplicated
    assert tl.source == TaskSource(kind="llm", model="fake-gpt-2026-01", prompt_version=PROMPT_VERSION,
                                   endpoint=f"127.0.0.1:{llm.port}", created=tl.source.created)
    assert tl.hash == label_set_hash(tl.labels).hex() and load_task("traffic-lights") == tl
    (req,) = llm.requests
    assert req["path"] == "/v1/chat/completions"
    assert req["headers"]["Authorization"] == f"Bearer {KEY}"
    body = req["body"]
    assert body["model"] == "gpt-4o" and body["temperature"] == 0 and "max_tokens" not in body
    assert body["messages"] == [{"role": "user", "content": render_prompt("traffic lights task", DESC)}]
    text = path.read_text()
    assert KEY not in text and json.loads(text)["format"] == FORMAT
    assert json.loads(text)["label_set_hash"] == tl.hash


def test_no_key_means_no_authorization_header(llm, cache, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    generate_task("t1", DESC, cfg_for(llm))
    assert "Authorization" not in llm.requests[0]["headers"]


@pytest.mark.parametrize("mode", ["fenced", "numbered"])
def test_tolerated_answer_formats(llm, cache, mode):
    llm.mode = mode
    tl = generate_task("t2", DESC, cfg_for(llm))
    assert len(tl.labels) == 33 and tl.labels[-1] == "bicycle"


def test_parse_labels_variants():
    assert parse_labels('{"labels": ["a", "B", " c "]}', min_labels=3) == ["a", "b", "c"]
    assert parse_labels("Sure! [\"a\", \"b\", \"c\"] hope this helps", min_labels=3) == ["a", "b", "c"]
    assert parse_labels("- car\n- bus\n* truck.\n", min_labels=3) == ["car", "bus", "truck"]
    assert parse_labels("car, bus, traffic light", min_labels=3) == ["car", "bus", "traffic light"]
    with pytest.raises(LabelGenerationError, match=r"non-string item\(s\) at \[1\]"):
        parse_labels('["car", 3, "bus"]', min_labels=1)
    with pytest.raises(LabelGenerationError, match="empty"):
        parse_labels("   ")


@pytest.mark.parametrize(
    "mode, msg",
    [
        ("malformed", r"holds \d label\(s\), fewer than 20 .*begins: \"I'm sorry, but I can't help"),
        ("few", r"holds 3 label\(s\), fewer than 20.*\[\"car\", \"bus\", \"truck\"\]"),
        (
            "not-json",
            r"did not answer with an OpenAI-compatible chat completion \(not JSON\): '<html>gateway says hi</html>'",
        ),
        ("truncated", r"cut off at the length limit"),
        (
            "401",
            r"/v1/chat/completions refused the request: HTTP 401 Unauthorized: 'Incorrect API key provided' "
            rf"\(check the API key in \${KEY_ENV}\)",
        ),
        ("429", r"HTTP 429 .*'Rate limit reached' \(rate limited"),
        ("500", r"HTTP 500 Internal Server Error: 'The server had an error' \(server error"),
        ("slow", r"no answer from http://127\.0\.0\.1:\d+/v1/chat/completions within 0\.3 s"),
    ],
)
def test_failures_are_clear_and_leave_the_cache_untouched(llm, cache, mode, msg):
    before = generate_task("traffic", DESC, cfg_for(llm))  # a previous list
    data = before.path.read_bytes()
    llm.mode = mode
    t0 = time.monotonic()
    with pytest.raises(LabelGenerationError, match=msg) as ei:
        generate_task("traffic", "something else", cfg_for(llm, timeout_s=0.3))
    assert time.monotonic() - t0 < 2.5
    assert KEY not in str(ei.value)
    assert before.path.read_bytes() == data and load_task("traffic") == before
    assert sorted(p.name for p in cache.iterdir()) == ["traffic.json"]  # no temporary file left


def test_connection_refused_names_the_url(cache):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    cfg = LlmConfig(url=f"http://127.0.0.1:{port}/v1/", api_key_env=KEY_ENV, timeout_s=2)
    with pytest.raises(LabelGenerationError, match=rf"cannot connect to http://127\.0\.0\.1:{port}/v1/chat/"
                                                   r"completions: connection refused"):
        generate_task("t3", DESC, cfg)
    assert not cache.exists()


def test_credentials_in_the_url_are_refused_without_echoing_them():
    for url in ("http://user:pw@127.0.0.1:1/v1", "https://host/v1?api-key=abc"):
        with pytest.raises(ValueError, match="api_key_env") as ei:
            LlmConfig(url=url)
        assert "pw" not in str(ei.value) and "abc" not in str(ei.value)


def test_llm_config_file_env_and_errors(tmp_path):
    p = tmp_path / "llm.yaml"
    p.write_text("url: http://127.0.0.1:8000/v1\nmodel: qwen2.5-vl\n")
    cfg = load_llm_config(p, env={"LATENTCAST_LLM__TIMEOUT_S": "7.5", "LATENTCAST_LLM__API_KEY_ENV": "MY_KEY"})
    assert (cfg.url, cfg.model, cfg.timeout_s, cfg.api_key_env) == ("http://127.0.0.1:8000/v1", "qwen2.5-vl", 7.5,
                                                                     "MY_KEY")
    assert load_llm_config(None, env={}) == LlmConfig()
    with pytest.raises(ValueError, match="must be an http"):
        load_llm_config(None, env={"LATENTCAST_LLM__URL": "ftp://x"})
    with pytest.raises(ValueError, match="timeout_s 0 must be > 0"):
        LlmConfig(timeout_s=0)


# ---------------------------------------------------------------------- the command


def test_task_new_show_list_commands(llm, cache, capsys):
    from latentcast.tools.cli import main

    assert main(["task", "new", "traffic", "--description", DESC, "--url", llm.url, "--model", "m1",
                 "--api-key-env", KEY_ENV, "--timeout", "5"]) == 0
    out = capsys.readouterr().out
    tl = load_task("traffic")
    assert tl.path == cache / "traffic.json" and tl.source.kind == "llm"
    assert f"wrote {tl.path}: 33 labels from fake-gpt-2026-01" in out and tl.hash in out
    assert "overrides the shipped list" in out and "can ground" in out
    assert llm.requests[0]["body"]["model"] == "m1"

    assert main(["task", "show", "traffic"]) == 0
    out = capsys.readouterr().out
    assert "traffic: 33 labels" in out and f"label set hash: {tl.hash}" in out
    assert f"model fake-gpt-2026-01, prompt {PROMPT_VERSION}, endpoint 127.0.0.1:{llm.port}" in out
    assert str(tl.path) in out and "school bus" in out
    assert "can ground 3 of 33 labels" in out  # car, "school bus" (-> bus), bicycle; the 30 'label i' unknown

    assert main(["task", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(ln.startswith("* traffic ") and " cache " in ln and tl.hash in ln for ln in lines)
    assert any(ln.startswith("  traffic ") and "shipped" in ln and "overridden" in ln for ln in lines)
    assert any(ln.startswith("* retail ") for ln in lines)

    llm.mode = "500"
    assert main(["task", "new", "traffic", "--description", DESC, "--url", llm.url]) == 1
    err = capsys.readouterr().err
    assert "HTTP 500" in err and "unchanged" in err and load_task("traffic") == tl

    assert main(["task", "show", "nope"]) == 2
    assert "no task list named 'nope'" in capsys.readouterr().err
    assert main(["task", "new", "Bad Name", "--description", DESC]) == 2
    assert "invalid task name 'Bad Name'" in capsys.readouterr().err


def test_task_show_json(cache, capsys):
    from latentcast.tools.cli import main

    assert main(["task", "show", "people-counting", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["name"] == "people-counting" and d["label_set_hash"] == load_task("people-counting").hash


# ---------------------------------------------------------------------- files


def _src(**kw) -> TaskSource:
    return TaskSource(**{"kind": "shipped", "model": "hand-curated", "created": "2026-01-01", **kw})


def test_labels_are_normalised_and_names_checked():
    assert normalize_labels([" Car", "car", "Traffic \n Light", "BUS"]) == ("car", "traffic light", "bus")
    tl = TaskList(name="x", description="d", labels=("A", "a", "b"), source=_src())
    assert tl.labels == ("a", "b") and tl.hash == label_set_hash(["a", "b"]).hex()
    for bad in ("Traffic", "-x", "a b", "", "x" * 65, "a/b"):
        with pytest.raises(TaskError, match="invalid task name"):
            TaskList(name=bad, description="d", labels=("a",), source=_src())
    with pytest.raises(TaskError, match="endpoint.*host\\[:port\\] only"):
        _src(kind="llm", prompt_version="v", endpoint="https://user:key@host/v1")
    with pytest.raises(TaskError, match="prompt_version: required"):
        _src(kind="llm")


@pytest.mark.parametrize("edit, msg", [
    (lambda d: d.pop("labels"), "missing field 'labels'"),
    (lambda d: d["labels"].__setitem__(1, 7), r"labels\[1\]: expected a string, got int 7"),
    (lambda d: d["labels"].__setitem__(0, "  "), r"labels\[0\]: empty label"),
    (lambda d: d.__setitem__("labels", []), "labels: empty"),
    (lambda d: d.__setitem__("labelz", 1), r"unknown field\(s\) 'labelz'"),
    (lambda d: d.__setitem__("format", "latentcast-task-9"), "format: 'latentcast-task-9' is not supported"),
    (lambda d: d.__setitem__("label_set_hash", "00000000"), "label_set_hash: '00000000' does not match"),
    (lambda d: d["source"].__setitem__("kind", "magic"), "source.kind: 'magic' is not one of shipped, llm"),
    (lambda d: d["source"].__setitem__("created", "yesterday"), "source.created: 'yesterday' is not an ISO 8601 date"),
    (lambda d: d["source"].pop("model"), "missing field 'source.model'"),
    (lambda d: d.__setitem__("name", "other"), "name: 'other' differs from the file name 'mine'"),
])
def test_bad_files_name_the_file_and_field(tmp_path, edit, msg):
    d = TaskList(name="mine", description="d", labels=("car", "bus"), source=_src()).to_dict()
    edit(d)
    p = tmp_path / "mine.json"
    p.write_text(json.dumps(d))
    with pytest.raises(TaskError, match=msg) as ei:
        load_task_file(p)
    assert str(p) in str(ei.value)


def test_unreadable_files(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(TaskError, match=rf"{p}: not valid JSON"):
        load_task_file(p)
    with pytest.raises(TaskError, match="not found"):
        load_task_file(tmp_path / "missing.json")


def test_atomic_save_keeps_the_old_file_on_failure(cache, monkeypatch):
    import os

    old = TaskList(name="t", description="d", labels=("car",), source=_src())
    path = save_task(old)
    assert path == cache / "t.json" and path.stat().st_mode & 0o777 == 0o644
    data = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_task(TaskList(name="t", description="d", labels=("bus",), source=_src()))
    assert path.read_bytes() == data and [p.name for p in cache.iterdir()] == ["t.json"]


def test_cache_wins_over_shipped(cache):
    assert cache_dir() == cache and load_task("traffic").path == shipped_dir() / "traffic.json"
    mine = TaskList(name="traffic", description="mine", labels=("car",), source=_src())
    save_task(mine)
    assert load_task("traffic") == mine
    entries = [(e.name, e.origin, e.active) for e in list_tasks() if e.name == "traffic"]
    assert entries == [("traffic", "cache", True), ("traffic", "shipped", False)]


# ---------------------------------------------------------------------- shipped lists


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_lists(name, cache):
    tl = load_task(name)
    assert tl.path == shipped_dir() / f"{name}.json" and tl.name == name and tl.description
    assert tl.source.kind == "shipped" and tl.source.model == "hand-curated" and tl.source.prompt_version is None
    assert tl.source.endpoint is None and tl.format == FORMAT
    assert json.loads(tl.path.read_text())["label_set_hash"] == tl.hash == label_set_hash(tl.labels).hex()
    assert normalize_labels(list(tl.labels)) == tl.labels  # stored normalised
    if name == "people-counting":
        assert 20 <= len(tl.labels) < 100 and "not 100+" in tl.description
    else:
        assert len(tl.labels) >= 100
    cov = label_coverage(tl.labels, COCO80, strict=False)
    assert len(cov.grounded) >= 5 and 0 in cov.class_to_label  # 'person' always
    assert tl.labels[cov.class_to_label[0]] == "person"


def test_shipped_lists_are_all_there_and_coco80_matches_the_shared_labels():
    assert {e.name for e in list_tasks() if e.origin == "shipped"} >= set(SHIPPED)
    from latentcast.shared import shared_dir

    try:
        path = shared_dir() / "models" / "coco80_labels.txt"
    except FileNotFoundError:
        pytest.skip("no shared folder")
    if path.is_file():
        assert tuple(s.strip() for s in path.read_text().splitlines() if s.strip()) == COCO80


# ---------------------------------------------------------------------- lenient mapping and the Fig. 3 filter

COCO = list(COCO80)


class StubDetector:
    labels = COCO

    def __init__(self, dets):
        self.dets = dets

    def detect(self, rgb):
        return list(self.dets)


def _det(cls: int, x0: float, score: float = 0.9) -> Detection:
    return Detection(x0=x0, y0=10.0, x1=x0 + 30.0, y1=60.0, class_id=cls, label=COCO[cls], score=score)


def test_lenient_mapping_skips_and_logs_once(caplog):
    labels = ["car", "unicorn", "school bus", "person with an umbrella", "group of people", "zebra crossing"]
    with pytest.raises(ValueError, match="unknown task label 'unicorn'"):
        map_labels(labels, COCO)
    with caplog.at_level(logging.INFO, logger="latentcast.edge.grounding"):
        m = map_labels(labels, COCO, strict=False)
    assert m == {COCO.index("car"): 0, COCO.index("bus"): 2, COCO.index("person"): 3}
    msgs = [r.getMessage() for r in caplog.records if "cannot ground" in r.getMessage()]
    assert msgs == ["the detector cannot ground 3 of 6 task labels (skipped): unicorn, group of people, zebra crossing"]
    with pytest.raises(ValueError, match="none of the 2 task labels can be grounded"):
        map_labels(["unicorn", "rainbow"], COCO, strict=False)
    with pytest.raises(ValueError, match="duplicate"):
        map_labels(["car", "Car"], COCO, strict=False)


def test_a_class_goes_to_the_label_that_names_it():
    m = map_labels(["vehicle", "car", "buses", "ferries"], COCO)
    assert m[COCO.index("car")] == 1 and m[COCO.index("bus")] == 2  # not 'vehicle', listed first
    assert m[COCO.index("truck")] == 0 and m[COCO.index("motorcycle")] == 0 and m[COCO.index("boat")] == 3
    cov = label_coverage(["car", "taxi", "unicorn"], COCO, strict=False)
    assert cov.grounded == (0,) and cov.shadowed == (1,) and cov.unknown == (2,)


def test_fig3_task_related_labels_only():
    """A bicycle and a car are detected; the task's list has no bicycle: only the car is an ROI."""
    frame = np.zeros((100, 200, 3), np.uint8)
    dets = [_det(COCO.index("bicycle"), 10.0), _det(COCO.index("car"), 100.0, 0.8)]
    g = Grounder(labels=["car", "truck", "traffic cone", "sedan"], detector=StubDetector(dets), margin=0,
                 strict_labels=False)
    r = g.update(frame)
    assert [(x.label_id, x.x0) for x in r.rois] == [(0, 100)] and [b.label for b in r.boxes] == ["car"]
    g2 = Grounder(labels=["car", "bicycle"], detector=StubDetector(dets), margin=0)
    assert sorted(b.label for b in g2.update(frame).boxes) == ["bicycle", "car"]
    with pytest.raises(ValueError, match="unknown task label 'traffic cone'"):
        Grounder(labels=["car", "traffic cone"], detector=StubDetector(dets))  # strict by default


# ---------------------------------------------------------------------- the edge


def test_edge_config_labels_from_task():
    from latentcast.config import ConfigError
    from latentcast.edge.config import GroundingConfig, load_edge_config

    cfg = load_edge_config(None, env={"LATENTCAST_EDGE__GROUNDING__TASK": "retail",
                                      "LATENTCAST_EDGE__GROUNDING__LABELS_FROM_TASK": "true"})
    assert cfg.grounding.task == "retail" and cfg.grounding.labels_from_task
    with pytest.raises(ValueError, match="invalid task name 'Traffic Cam'"):
        GroundingConfig(task="Traffic Cam", labels_from_task=True)
    with pytest.raises(ConfigError, match="invalid task name"):
        load_edge_config(None, env={"LATENTCAST_EDGE__GROUNDING__TASK": "a b",
                                    "LATENTCAST_EDGE__GROUNDING__LABELS_FROM_TASK": "1"})
    GroundingConfig(task="Any Name")  # only a task list name is checked


def test_edge_cli_task_flag_sets_the_config(monkeypatch, cache, capsys):
    import latentcast.edge.app as app_mod
    from latentcast.tools.cli import main

    seen = {}
    real = app_mod.EdgeApp

    class StubApp:
        def __init__(self, cfg):
            seen["cfg"] = cfg

        async def run(self, max_frames=None, stop=None):
            return {"task": seen["cfg"].grounding.task}

    monkeypatch.setattr(app_mod, "EdgeApp", StubApp)
    assert main(["edge", "--task", "traffic", "--source", "x.avi", "--max-frames", "1"]) == 0
    g = seen["cfg"].grounding
    assert g.task == "traffic" and g.labels_from_task
    monkeypatch.setattr(app_mod, "EdgeApp", real)
    assert main(["edge", "--task", "no-such-task", "--source", "x.avi"]) == 2
    assert "no task list named 'no-such-task'" in capsys.readouterr().err


class _FakeSource:
    fps, live, pace, reconnects = 10.0, False, "none", 0

    def __iter__(self):
        from latentcast.edge.capture import CapturedFrame

        for i in range(3):
            yield CapturedFrame(i, int(time.time() * 1e6), np.zeros((48, 64, 3), np.uint8))

    def close(self):
        pass


class _FakeEncoder:
    n_rates = 3
    manifest = {"codec_id": 1}
    weights_hash = b"\1" * 8

    def __init__(self):
        self.calls = []

    def compress(self, rgb, rois, *, rate_point, roi_only, label_set_hash):
        self.calls.append((list(rois), label_set_hash))
        return b"packet" + label_set_hash


async def test_edge_task_list_labels_and_hash_reach_the_headers(cache, monkeypatch):
    """`edge --task traffic` (grounding.task + labels_from_task): the session header carries the
    task list's labels, every packet its label-set hash; the grounder skips what YOLOX cannot ground."""
    import latentcast.detector
    from latentcast.edge.app import EdgeApp
    from latentcast.edge.config import EdgeConfig
    from tests.test_edge_client import CameraState, FakeCloud, start_server

    car = COCO.index("car")
    monkeypatch.setattr(latentcast.detector, "YoloxDetector",
                        lambda **kw: StubDetector([_det(car, 5.0), _det(COCO.index("kite"), 30.0)]))
    tl = load_task("traffic")
    packets = []

    async def keep(f):
        packets.append(f)

    cameras: dict[str, CameraState] = {}
    cloud = FakeCloud(cameras, on_frame=keep)
    server, port = await start_server(cloud)
    cfg = EdgeConfig(camera_id="task-cam")
    cfg.grounding.task, cfg.grounding.labels_from_task = "traffic", True
    cfg.server.target = f"127.0.0.1:{port}"
    cfg.server.backoff_initial_s, cfg.server.backoff_max_s = 0.05, 0.2
    cfg.sender.queue_size = 16  # the fake encoder is instant: keep every frame for the check below
    enc = _FakeEncoder()
    app = EdgeApp(cfg, source=_FakeSource(), encoder=enc)
    assert app.labels == list(tl.labels) and app.task_list == tl
    try:
        stats = await asyncio.wait_for(app.run(), 30)
    finally:
        await server.stop(None)
    hdr = cloud.headers[0]
    assert hdr.task == "traffic" and list(hdr.labels) == list(tl.labels)
    assert label_set_hash(hdr.labels) == tl.hash_bytes  # what the cloud derives from the session header
    assert app._grounder.strict_labels is False
    assert [h for _, h in enc.calls] == [tl.hash_bytes] * 3
    rois = enc.calls[0][0]
    assert [r.label_id for r in rois] == [tl.labels.index("car")]  # the kite is no traffic label: no ROI
    assert cameras["task-cam"].processed == [0, 1, 2] and len(packets) == 3
    assert stats["task"] == "traffic" and stats["label_set_hash"] == tl.hash
    assert stats["label_count"] == len(tl.labels)
