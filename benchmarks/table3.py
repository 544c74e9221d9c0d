"""The M2M seed's Table 3 for every policy, side by side, resumable and parallel.

    python -m benchmarks.table3 --scenarios S1,S2,S3 --policies default,random,search --out DIR
        [--cases 10] [--max-steps 20] [--seed 0] [--knowledge kb.json] [--workers N | --ray [ADDRESS]]
        [--cot] [--memory-k 3] [--action-scope all|weights_only] [--base-url URL]

(also ``rtenv bench table3 ...``). Policies, each a named spec:

* ``default``: no tuning (the starting plan);
* ``random``: a uniformly random point of the continuous action map each step (weights
  log-uniform in [0.01, 1000], other TPPs uniform in their ranges);
* ``knowledge-sample``: each TPP drawn independently from the knowledge base's values each step
  (no LLM: tells whether an LLM adds anything beyond the distribution);
* ``search``: CMA-ES (:func:`rtenv.search.cma_search`); one step = one generation of
  ``SEARCH_POPSIZE`` plans solved in one batched TPS call;
* ``ALGO:PATH`` (``acer``, ``ppo``, ``a2c``, ``dqn``): a stable-baselines3 model on the discrete
  actions;
* ``llm:BACKEND:MODEL[:guided|unguided]``: :class:`llm_policy.policy.LLMPolicy` (``MODEL``
  ``default`` = SmolLM2-135M-Instruct; guided needs ``--knowledge``).

Any entry may end in ``@N`` to run only its first ``N`` starting states (e.g. a slow LLM row).

Starting states follow the seed: S1 and S2 start every test case from the SPEC default TPPs; S3
starts one liver case (test case 0) from 10 seeded random TPP vectors. Scores are binary (one
point per criterion met), as in the seed. Every finished episode is appended to
``results.jsonl`` at once, so an interrupted run resumes where it stopped; ``table3.md``,
``summary.json`` and the figures are rewritten from all records at the end. ``run_settings.json``
beside it records what the episode keys do not name (the knowledge base, the LLM options and the
sha256 of each policy's local model file): a resume with other ones is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from llm_policy.backends import DEFAULT_TEMPERATURE, BackendError  # standard library only: the parser stays cheap
from rtenv.runlog import (
    check_output_path,
    exclusive,
    file_sha256,
    read_json,
    read_jsonl,
    settings_changes,
    write_atomic,
)
from rtenv.validation import check_integer, is_real

SCENARIO_CHOICES = ("S1", "S2", "S3", "TG119")
SEARCH_POPSIZE = 8
# M2M seed, Table 3 (SPEC section 4): mean, sd over 10 episodes; scores binary
PAPER_TABLE3 = {
    "S1": {"max": 9, "initial": (6.0, 1.8), "without": (7.0, 1.7), "with": (9.0, 0.0),
           "steps_without": (18.1, 4.1), "steps_with": (2.1, 0.3)},
    "S2": {"max": 15, "initial": (11.3, 1.4), "without": (13.6, 2.0), "with": (15.0, 0.0),
           "steps_without": (12.4, 6.5), "steps_with": (3.9, 2.0)},
    "S3": {"max": 4, "initial": (2.5, 0.4), "without": (2.2, 0.4), "with": (4.0, 0.0),
           "steps_without": (20.0, 0.0), "steps_with": (5.3, 2.9)},
}


@dataclass(frozen=True)
class LLMOptions:
    """Options shared by every ``llm:`` policy of a run."""

    chain_of_thought: bool = False
    memory_k: int = 0
    action_scope: str = "all"
    base_url: str | None = None
    temperature: float = DEFAULT_TEMPERATURE

    def __post_init__(self) -> None:
        if not (is_real(self.temperature) and 0.0 <= self.temperature <= 2.0):
            raise ValueError(f"temperature (--temperature) = {self.temperature!r} must be a number in [0, 2]")
        from llm_policy.prompt import PromptOptions

        PromptOptions(chain_of_thought=self.chain_of_thought, memory_k=self.memory_k,
                      action_scope=self.action_scope)  # --memory-k and --action-scope, before any episode


@dataclass(frozen=True)
class EpisodeSpec:
    """One Table 3 episode: a policy on one starting state of one scenario."""

    policy: str
    scenario: str
    case: int
    start: str  # "default" or "random:<seed>"
    seed: int
    max_steps: int

    @property
    def key(self) -> str:
        return f"{self.policy}|{self.scenario}|{self.case}|{self.start}|{self.seed}|{self.max_steps}"


def policy_count(policy: str, cases: int) -> tuple[str, int]:
    """``(name, episodes)`` of a policy entry: ``NAME@N`` runs ``N`` episodes (the first ``N``
    starting states) instead of ``cases``, e.g. fewer for a slow LLM row."""
    name, at, n = policy.rpartition("@")
    if not at:
        return policy, cases
    if not n.isdigit() or not 1 <= int(n) <= 10:
        raise ValueError(f"policy {policy!r}: the episode count after '@' must be an integer in [1, 10]")
    return name, int(n)


def episode_specs(scenarios: Sequence[str], policies: Sequence[str], cases: int = 10, max_steps: int = 20,
                  seed: int = 0) -> list[EpisodeSpec]:
    """Every episode of a run, in a fixed order (scenario, policy, starting state). A policy
    ``NAME@N`` gets the first ``N`` starting states instead of ``cases``."""
    if not 1 <= cases <= 10:
        raise ValueError(f"--cases {cases} is outside [1, 10] (the test cohort has 10 cases)")
    if max_steps < 1:
        raise ValueError(f"--max-steps {max_steps} must be >= 1")
    if seed < 0:
        raise ValueError(f"--seed {seed} must be >= 0")
    names = [policy_count(entry, cases)[0] for entry in policies]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"policies {twice} are listed more than once")
    twice = sorted({sc for sc in scenarios if list(scenarios).count(sc) > 1})
    if twice:  # each episode would run twice and count twice
        raise ValueError(f"scenarios {twice} are listed more than once")
    out = []
    for sc in scenarios:
        if sc not in SCENARIO_CHOICES:
            raise ValueError(f"unknown scenario {sc!r}; valid: {list(SCENARIO_CHOICES)}")
        for entry in policies:
            pol, n = policy_count(entry, cases)
            parse_policy(pol)
            for i in range(n):
                if sc in ("S3", "TG119"):  # S3 as in the seed: one liver case, random starts; TG119: one case
                    out.append(EpisodeSpec(pol, sc, 0, f"random:{seed + i}", seed + i, max_steps))
                else:
                    out.append(EpisodeSpec(pol, sc, i, "default", seed + i, max_steps))
    return out


def parse_policy(spec: str) -> dict[str, Any]:
    """``{"kind": ..., ...}`` of a policy spec; raises ``ValueError`` naming the valid forms."""
    if spec in ("default", "random", "knowledge-sample", "search"):
        return {"kind": spec}
    head, _, rest = spec.partition(":")
    if head == "llm":
        parts = rest.split(":")
        if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
            raise ValueError(f"policy {spec!r}: use llm:BACKEND:MODEL[:guided|unguided]")
        mode = parts[2] if len(parts) == 3 else "guided"
        if mode not in ("guided", "unguided"):
            raise ValueError(f"policy {spec!r}: the last part must be 'guided' or 'unguided'")
        return {"kind": "llm", "backend": parts[0], "model": None if parts[1] == "default" else parts[1],
                "guided": mode == "guided"}
    if head in ("acer", "ppo", "a2c", "dqn") and rest:
        return {"kind": "sb3", "spec": spec}
    raise ValueError(f"unknown policy {spec!r}; valid: default, random, knowledge-sample, search, ALGO:PATH "
                     "(acer, ppo, a2c, dqn), llm:BACKEND:MODEL[:guided|unguided]")


# ----------------------------------------------------------------------------------- episodes
_MODELS: dict[tuple, Any] = {}  # per process: loaded SB3 models and LLM backends


def _cached(key: tuple, make) -> Any:
    if key not in _MODELS:
        _MODELS[key] = make()
    return _MODELS[key]


def run_episode_spec(spec: EpisodeSpec, knowledge_path: str | None = None, llm: LLMOptions | None = None,
                     device: str = "cpu") -> dict[str, Any]:
    """Run one episode; returns its JSON record."""
    from rtenv.env import TPPTuningEnv
    from rtenv.rollout import EpisodeRecord, run_episode

    t0 = time.perf_counter()
    llm = llm or LLMOptions()
    pol = parse_policy(spec.policy)
    kb = None
    if pol["kind"] == "knowledge-sample" or (pol["kind"] == "llm" and pol["guided"]):
        if not knowledge_path:
            raise ValueError(f"policy {spec.policy!r} needs --knowledge kb.json")
        from knowledge_extraction.knowledge import load_knowledge

        kb = load_knowledge(knowledge_path)
    mode = "discrete" if pol["kind"] == "sb3" else "continuous"
    env = TPPTuningEnv(spec.scenario, action_mode=mode, cohort="test", cases=[spec.case], max_steps=spec.max_steps,
                       scoring_mode="binary", device=device)
    options: dict[str, Any] = {"index": spec.case}
    if spec.start.startswith("random:"):
        from rtenv.tpp import TPP

        rng = np.random.default_rng(int(spec.start.split(":")[1]))
        options["tpp"] = TPP.random(env.core.structures, rng).values
    extra: dict[str, Any] = {}
    if pol["kind"] == "search":
        record = _search_episode(env, spec, options)
    elif pol["kind"] == "default":
        _, info = env.reset(seed=spec.seed, options=options)
        record = EpisodeRecord(case=info["case"], initial_score=info["score"], final_score=info["score"],
                               initial_binary_score=info["score"], final_binary_score=info["score"],
                               max_score=info["max_score"], steps=0, full_score=bool(info["full_score"]),
                               final_tpp=info["tpp"], final_dv_metrics=info["dv_metrics"],
                               score_trajectory=[info["score"]]).to_dict()
    else:
        policy = _step_policy(pol, env, kb, llm, spec, device)
        record = run_episode(env, policy, seed=spec.seed, options=options).to_dict()
        if pol["kind"] == "llm":
            logs = policy.log
            extra = {"llm_prompt_tokens": sum(lg.prompt_tokens for lg in logs),
                     "llm_completion_tokens": sum(lg.completion_tokens for lg in logs),
                     "llm_seconds": sum(lg.llm_seconds for lg in logs),
                     "llm_valid_first_rate": (sum(lg.valid_first for lg in logs) / len(logs)) if logs else None,
                     "llm_fallbacks": sum(lg.fallback for lg in logs)}
    record.update(asdict(spec), key=spec.key, wall_s=round(time.perf_counter() - t0, 3), **extra)
    record["case"] = f"{spec.scenario}-test-{spec.case}"
    return record


def _step_policy(pol: dict[str, Any], env, kb, llm: LLMOptions, spec: EpisodeSpec, device: str):
    """The ``policy(obs, info) -> action`` of a stepping policy (random, knowledge-sample, SB3, LLM)."""
    rng = np.random.default_rng(spec.seed)
    if pol["kind"] == "random":
        return lambda obs, info: rng.uniform(-1.0, 1.0, env.core.n_tpp).astype(np.float32)
    if pol["kind"] == "knowledge-sample":
        from llm_policy.prompt import knowledge_guidance

        guide = knowledge_guidance(kb, env.core.structures)
        missing = [n for n in env.core.names if n not in guide]
        if missing:
            raise ValueError(f"knowledge base has no values for {missing}")
        return lambda obs, info: env.core.tpp_to_action(np.array([rng.choice(guide[n]["values"])
                                                                  for n in env.core.names]))
    if pol["kind"] == "sb3":
        from drl.train import load_policy
        from drl.transfer import policy_for_scenario

        model = _cached(("sb3", pol["spec"], device), lambda: load_policy(pol["spec"], device=device))
        return policy_for_scenario(model, spec.scenario)
    from llm_policy.backends import make_backend
    from llm_policy.policy import LLMPolicy
    from llm_policy.prompt import PromptOptions

    backend = _cached(("llm", pol["backend"], pol["model"], llm.base_url, device),
                      lambda: make_backend(pol["backend"], model=pol["model"], base_url=llm.base_url, device=device))
    return LLMPolicy.for_env(env, backend, knowledge=kb, temperature=llm.temperature, seed=spec.seed,
                             options=PromptOptions(guidance=pol["guided"], memory_k=llm.memory_k,
                                                   chain_of_thought=llm.chain_of_thought,
                                                   action_scope=llm.action_scope))


def _search_episode(env, spec: EpisodeSpec, options: dict[str, Any]) -> dict[str, Any]:
    from rtenv.search import search_episode

    _, info = env.reset(seed=spec.seed, options=options)
    start = np.array([info["tpp"][n] for n in env.core.names])
    return search_episode(env.core, ("test", spec.case), start, generations=spec.max_steps, popsize=SEARCH_POPSIZE,
                          seed=spec.seed).to_dict()


# ----------------------------------------------------------------------------------- execution
def _init_worker() -> None:
    """A pool worker: one torch thread; Ctrl-C is the main process's to handle (it stops the pool),
    and a worker whose main process died (killed) exits instead of waiting for work for ever."""
    import torch

    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _pool_results(todo: list[EpisodeSpec], knowledge: str | None, llm: LLMOptions, workers: int,
                  device: str) -> Iterator[dict[str, Any]]:
    """The episodes run in ``workers`` processes, as they finish. A run that is stopped (Ctrl-C,
    SIGTERM, an error here) stops its workers at once and drops the queued episodes: what had
    finished is written, the rest runs on resume."""
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker)
    term = None
    if threading.current_thread() is threading.main_thread():  # SIGTERM: unwind like Ctrl-C, stopping the pool
        term = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        futures = [ex.submit(run_episode_spec, s, knowledge, llm, device) for s in todo]
        yield from _failures_last(fut.result for fut in as_completed(futures))
    except BaseException:
        for proc in list(getattr(ex, "_processes", {}).values()):
            proc.terminate()
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        if term is not None:
            signal.signal(signal.SIGTERM, term)
    ex.shutdown()


def _execute(todo: list[EpisodeSpec], knowledge: str | None, llm: LLMOptions, workers: int,
             ray_address: str | None | bool, device: str) -> Iterator[dict[str, Any]]:
    if ray_address is not False:
        import ray

        local: dict[str, Any] = {"num_cpus": workers}
        if device.startswith("cuda"):  # torch's GPU count (Ray's own needs NVML)
            import torch

            local["num_gpus"] = torch.cuda.device_count()
        ray.init(address=ray_address or None, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True, **({} if ray_address else local))
        gpus = 0
        if device.startswith("cuda"):
            # each task asks for a share of a GPU, so that Ray places it on a node with one and
            # packs `workers` tasks per GPU; Ray shows a task only its GPU, as "cuda"
            if not ray.cluster_resources().get("GPU", 0):
                raise ValueError(f"--device {device}: the Ray cluster has no GPU (its tasks would wait for ever)")
            gpus, device = 1 / max(workers, 1), "cuda"
        remote = ray.remote(num_cpus=1, num_gpus=gpus)(run_episode_spec)
        pending = [remote.remote(s, knowledge, llm, device) for s in todo]

        def arrivals() -> Iterator[Callable[[], dict[str, Any]]]:
            nonlocal pending
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield lambda ref=done[0]: ray.get(ref)

        yield from _failures_last(arrivals())
        return
    if workers <= 1:
        for s in todo:
            yield run_episode_spec(s, knowledge, llm, device)
        return
    yield from _pool_results(todo, knowledge, llm, workers, device)


def _failures_last(results: Iterable[Callable[[], dict[str, Any]]]) -> Iterator[dict[str, Any]]:
    """The records of parallel episodes as they arrive; an episode that failed does not cost the
    others (each finished one is handed on, and written), and the first failure is raised at the end."""
    failures: list[Exception] = []
    for result in results:
        try:
            record = result()
        except Exception as exc:  # noqa: BLE001 (re-raised below)
            failures.append(exc)
            continue
        yield record
    if failures:
        raise failures[0]


def run_table3(scenarios: Sequence[str], policies: Sequence[str], out: str | Path, cases: int = 10,
               max_steps: int = 20, seed: int = 0, knowledge: str | None = None, llm: LLMOptions | None = None,
               workers: int | None = None, ray_address: str | None | bool = False, device: str = "cpu",
               progress: bool = True, figures: bool = True) -> dict[str, Any]:
    """Run (or resume) a Table 3 and write ``results.jsonl``, ``table3.md``, ``summary.json``
    and figures under ``out``; returns the summary."""
    if workers is not None:
        check_integer("workers", workers, 1)
    from rtenv.tps import resolve_device

    device = str(resolve_device(device))  # an absent CUDA stops the run here, not in every episode
    out = check_output_path(out, "--out", "dir")
    llm = llm or LLMOptions()
    specs = episode_specs(scenarios, policies, cases, max_steps, seed)
    names = [policy_count(p, cases)[0] for p in policies]
    needs_kb = [p for p in names if p == "knowledge-sample" or (p.startswith("llm:") and parse_policy(p)["guided"])]
    if needs_kb and not knowledge:
        raise ValueError(f"policies {needs_kb} need --knowledge kb.json")
    models = _model_files(names, llm)  # a missing model or an unknown backend stops the run before any episode
    with exclusive(out, "table3 run"):  # one run per folder: two would mix their settings and records
        path = out / "results.jsonl"
        done = {r["key"]: r for r in read_jsonl(path)}
        _check_run_settings(out / "run_settings.json", knowledge, llm, models, device, resuming=bool(done))
        # starting state first: every policy's first episodes finish first (a cut run stays balanced)
        todo = sorted((s for s in specs if s.key not in done), key=lambda s: s.seed)
        workers = workers if workers is not None else min(os.cpu_count() or 1, max(len(todo), 1))
        bar = tqdm(total=len(specs), initial=len(specs) - len(todo), unit="episode", desc="table3",
                   disable=not progress)
        finals: dict[str, list[float]] = {}
        for r in done.values():
            finals.setdefault(f"{r['scenario']}/{r['policy']}", []).append(r["final_score"])
        with path.open("a") as f:
            for rec in _execute(todo, knowledge, llm, workers, ray_address, device):
                f.write(json.dumps(rec) + "\n")
                f.flush()
                done[rec["key"]] = rec
                finals.setdefault(f"{rec['scenario']}/{rec['policy']}", []).append(rec["final_score"])
                bar.set_postfix_str(", ".join(f"{k} {statistics.mean(v):.2f}" for k, v in finals.items())[:200])
                bar.update(1)
        bar.close()
        records = [done[s.key] for s in specs]
        summary = summarise(records)
        summary["command"] = {"scenarios": list(scenarios), "policies": list(policies), "cases": cases,
                              "max_steps": max_steps, "seed": seed, "knowledge": knowledge, "llm": asdict(llm),
                              "device": device}
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        (out / "table3.md").write_text(table_markdown(summary))
        if figures:
            write_figures(records, out)
        return summary


def _check_run_settings(path: Path, knowledge: str | None, llm: LLMOptions, model_files: dict[str, Path],
                        device: str = "cpu", resuming: bool = True) -> None:
    """Episode keys name the policy, case, start, seed and budget, not the settings every
    episode shares: the knowledge base (by content), the LLM options and the torch device (plans
    on a GPU may part from CPU ones by float rounding), nor the model file behind
    a policy name (by content, see :func:`_model_files`). They are written beside the results, and
    a resume with other ones is refused rather than mixed in; a resume that adds policies adds
    their model files. Without finished episodes (``resuming`` False) the recorded settings are
    replaced: there is nothing to mix."""
    from knowledge_extraction.knowledge import load_knowledge

    kb = None if knowledge is None else hashlib.sha256(
        json.dumps(load_knowledge(knowledge), sort_keys=True).encode()).hexdigest()
    settings = {"knowledge_sha256": kb, "llm": asdict(llm), "device": device}
    models = {name: file_sha256(file) for name, file in model_files.items()}
    if path.is_file() and resuming:
        before = read_json(path, "Table 3 run settings file")
        if not isinstance(before, dict):
            raise ValueError(f"{path} is not a Table 3 run settings file (a JSON object); use another --out")
        before.setdefault("device", "cpu")  # runs before the device was recorded were CPU runs
        changed = settings_changes(before, settings, keys=settings)
        if changed:
            raise ValueError(f"{path.parent} holds episodes run with other settings ({'; '.join(changed)}); "
                             "use another --out")
        recorded = before.get("model_sha256", {})
        replaced = sorted(n for n in models if recorded.get(n, models[n]) != models[n])
        if replaced:
            raise ValueError(f"{path.parent} holds episodes of {replaced} run with another model file "
                             "(its sha256 differs); use another --out")
        models = {**recorded, **models}
    write_atomic(path, json.dumps({**settings, "model_sha256": models}, indent=2))


def _model_files(policies: Sequence[str], llm: LLMOptions) -> dict[str, Path]:
    """The local model file behind each policy name that has one: the SB3 zip of ``ALGO:PATH``
    (``acer:default``: the shipped one) and the GGUF file of a local LLM (``default``: the shipped
    one; a ``transformers`` model folder has no single file and is left out). Checked before the
    first episode: a missing model, an unknown backend or an unusable ``--base-url`` raises
    (``FileNotFoundError``, ``ValueError`` or :class:`~llm_policy.backends.BackendError`, naming
    the policy)."""
    from llm_policy.backends import check_backend

    files = {}
    for name in policies:
        pol = parse_policy(name)
        if pol["kind"] == "sb3":
            from drl.train import policy_file

            files[name] = policy_file(pol["spec"])
        elif pol["kind"] == "llm":
            try:
                file = check_backend(pol["backend"], pol["model"], llm.base_url)
            except (ValueError, BackendError) as exc:
                raise type(exc)(f"policy {name!r}: {exc}") from None
            if file is not None and file.is_file():
                files[name] = file
    return files


# ------------------------------------------------------------------------------------ reporting
def _ms(values: Iterable[float]) -> tuple[float, float]:
    v = list(values)
    return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)


def _criteria(scenario: str) -> list[tuple[str, str, float, float, str]]:
    """Per criterion of the scenario's protocol: name, unit, goal and limit (in that unit), sense."""
    from rtenv.evaluation import Protocol
    from rtenv.scenarios import get_scenario

    sc = get_scenario(scenario)
    return [(c.name, c.unit, *c.thresholds(sc.prescription_gy), c.sense) for c in Protocol.load(sc.protocol).criteria]


def summarise(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per scenario and policy: episodes, initial/final score and steps (mean, sd), max score,
    full-score rate, wall time and LLM tokens; and per protocol criterion the final value's mean
    and sd (in the criterion's unit) and the number of plans that meet its goal (the seed's
    Fig. 4 figures)."""
    from rtenv.evaluation import criterion_score

    groups: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in records:
        groups.setdefault(r["scenario"], {}).setdefault(r["policy"], []).append(r)
    out: dict[str, Any] = {"scenarios": {}}
    for sc, by_policy in groups.items():
        rows = {}
        criteria = _criteria(sc)
        for pol, rs in by_policy.items():
            row = {"episodes": len(rs), "max_score": rs[0]["max_score"],
                   "full_score_rate": sum(r["full_score"] for r in rs) / len(rs),
                   "wall_s_mean": statistics.mean(r["wall_s"] for r in rs)}
            for name in ("initial_score", "final_score", "steps"):
                row[f"{name}_mean"], row[f"{name}_sd"] = _ms(float(r[name]) for r in rs)
            row["best_final_score"] = max(r["final_score"] for r in rs)
            row["dv_metrics"] = {}
            for name, unit, goal, limit, sense in criteria:
                values = [float(r["final_dv_metrics"][name]) for r in rs]
                mean, sd = _ms(values)
                met = sum(criterion_score(v, goal, limit, sense=sense, mode="binary") == 1.0 for v in values)
                row["dv_metrics"][name] = {"mean": mean, "sd": sd, "unit": unit, "goal": goal, "sense": sense,
                                           "goal_met": met}
            if "llm_prompt_tokens" in rs[0]:
                row["llm_tokens_per_step"] = (sum(r["llm_prompt_tokens"] + r["llm_completion_tokens"] for r in rs)
                                              / max(1, sum(r["steps"] for r in rs)))
                firsts = [r["llm_valid_first_rate"] for r in rs if r["llm_valid_first_rate"] is not None]
                row["llm_valid_first_rate"] = statistics.mean(firsts) if firsts else None
            rows[pol] = row
        out["scenarios"][sc] = rows
    return out


def table_markdown(summary: dict[str, Any]) -> str:
    """Table 3 in the seed's layout, with the paper's GPT-4o rows for reference."""
    lines = ["# Table 3: TPP tuning by policy (binary scores; mean +- sd over episodes)", ""]
    for sc, rows in summary["scenarios"].items():
        max_score = next(iter(rows.values()))["max_score"]
        lines += [f"## {sc} (max score {max_score:g})", "",
                  "| policy | episodes | initial score | final score | best | full score | steps |",
                  "|---|---|---|---|---|---|---|"]
        for pol, r in rows.items():
            lines.append(f"| {pol} | {r['episodes']} | {r['initial_score_mean']:.1f} +- {r['initial_score_sd']:.1f} | "
                         f"{r['final_score_mean']:.1f} +- {r['final_score_sd']:.1f} | {r['best_final_score']:g} | "
                         f"{100 * r['full_score_rate']:.0f} % | {r['steps_mean']:.1f} +- {r['steps_sd']:.1f} |")
        paper = PAPER_TABLE3.get(sc)
        if paper:
            for label, key, steps in (("GPT-4o without knowledge (paper)", "without", "steps_without"),
                                      ("GPT-4o with knowledge (paper)", "with", "steps_with")):
                lines.append(f"| {label} | 10 | {paper['initial'][0]:.1f} +- {paper['initial'][1]:.1f} | "
                             f"{paper[key][0]:.1f} +- {paper[key][1]:.1f} | | | "
                             f"{paper[steps][0]:.1f} +- {paper[steps][1]:.1f} |")
        lines.append("")
    lines += ["# Final dose-volume metrics by policy (mean +- sd; plans meeting the goal)", ""]
    for sc, rows in summary["scenarios"].items():
        metrics = next(iter(rows.values())).get("dv_metrics")
        if not metrics:  # a summary written before these were recorded
            continue
        lines += [f"## {sc}", "", "| criterion | goal | " + " | ".join(rows) + " |",
                  "|---|---|" + "---|" * len(rows)]
        for name, m in metrics.items():
            cells = [f"{r['dv_metrics'][name]['mean']:.1f} +- {r['dv_metrics'][name]['sd']:.1f} "
                     f"({r['dv_metrics'][name]['goal_met']}/{r['episodes']})" for r in rows.values()]
            goal = f"{'<=' if m['sense'] == 'upper' else '>='} {m['goal']:.4g} {m['unit']}"
            lines.append(f"| {name} | {goal} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_figures(records: Sequence[dict[str, Any]], out: Path) -> list[Path]:
    """Score trajectories, final TPP and dose-volume distributions per policy, Spearman heatmaps."""
    from knowledge_extraction.analysis import (
        plot_metric_distributions,
        plot_spearman,
        plot_tpp_distributions,
        spearman_table,
    )
    from rtenv.evaluation import Protocol
    from rtenv.plots import new_figure, save_figure
    from rtenv.scenarios import get_scenario

    paths = []
    by_sc: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in records:
        by_sc.setdefault(r["scenario"], {}).setdefault(r["policy"], []).append(r)
    for sc, groups in by_sc.items():
        fig, ax = new_figure(figsize=(8.0, 4.0))
        top = max(r["max_score"] for rs in groups.values() for r in rs)
        steps = max(len(r["score_trajectory"]) for rs in groups.values() for r in rs) - 1
        for pol, rs in groups.items():
            length = max(len(r["score_trajectory"]) for r in rs)
            padded = np.array([(t := r["score_trajectory"]) + [t[-1]] * (length - len(t)) for r in rs], dtype=float)
            mean = padded.mean(axis=0)
            sd = padded.std(axis=0, ddof=1) if len(rs) > 1 else np.zeros(length)  # the table's sample SD
            if length == 1:  # a policy that took no step (default): its score holds over the whole run
                ax.plot([0, max(steps, 1)], [mean[0], mean[0]], ls="--", label=f"{pol} (no steps)")
                continue
            line, = ax.plot(range(length), mean, marker=".", label=pol)
            # the band is clipped to the scores a plan can have
            ax.fill_between(range(length), np.maximum(mean - sd, 0.0), np.minimum(mean + sd, top), alpha=0.15,
                            color=line.get_color())
        ax.axhline(top, color="0.4", lw=0.9, ls=":", label=f"full score ({top:g})")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("step")
        ax.set_ylabel("score (binary)")
        ax.set_title(f"{sc}: score per step (mean +- sd, band clipped to [0, {top:g}]; finished episodes hold "
                     "their final score)", fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        paths.append(save_figure(fig, out / f"trajectories_{sc}.png"))
        paths.append(plot_tpp_distributions({p: {n: [r["final_tpp"][n] for r in rs] for n in rs[0]["final_tpp"]}
                                             for p, rs in groups.items()}, out / f"final_tpps_{sc}.png",
                                            title=f"{sc}: final TPPs per policy"))
        paths.append(plot_metric_distributions({p: {m: [r["final_dv_metrics"][m] for r in rs]
                                                    for m in rs[0]["final_dv_metrics"]} for p, rs in groups.items()},
                                               out / f"dv_metrics_{sc}.png", title=f"{sc}: final dose-volume metrics",
                                               units={c.name: c.unit for c in
                                                      Protocol.load(get_scenario(sc).protocol).criteria}))
        for pol, rs in groups.items():
            if len(rs) >= 3:
                table = spearman_table(rs)
                if np.isfinite(np.array(table["rho"], dtype=float)).any():
                    safe = pol.replace(":", "_").replace("/", "_")
                    paths.append(plot_spearman(table, out / f"spearman_{sc}_{safe}.png",
                                               title=f"{sc} {pol}: final TPPs vs dose-volume metrics"))
    return paths


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m benchmarks.table3", description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default="S1,S2,S3", help="comma-separated (S1, S2, S3, TG119)")
    p.add_argument("--policies", default="default,random,search", help="comma-separated policy specs")
    p.add_argument("--out", required=True, help="output directory (results.jsonl resumes a run)")
    p.add_argument("--cases", type=int, default=10, help="episodes per scenario and policy (1-10)")
    p.add_argument("--max-steps", type=int, default=20,
                   help="steps per episode; CMA-ES generations for search (default 20)")
    p.add_argument("--seed", type=int, default=0, help="episode i is seeded with seed + i (default 0)")
    p.add_argument("--knowledge", default=None, help="knowledge base for knowledge-sample and guided LLMs")
    p.add_argument("--workers", type=int, default=None, help="local processes (default: one per core)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on Ray (a cluster address, or a local Ray without one)")
    p.add_argument("--cot", action="store_true", help="LLM policies: chain of thought")
    p.add_argument("--memory-k", type=int, default=0, help="LLM policies: prior attempts shown, 0-20 (default 0)")
    p.add_argument("--action-scope", default="all", choices=["all", "weights_only"],
                   help="LLM policies: TPPs the model may change (default all)")
    p.add_argument("--base-url", default=None, help="LLM policies with the openai backend")
    p.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                   help=f"LLM policies: sampling temperature in [0, 2] (default {DEFAULT_TEMPERATURE}, DOLA's best; "
                        "DOLA swept 0.1-1.0: one --out folder per temperature)")
    p.add_argument("--device", default="cpu", help="torch device of the TPS and the policies (default cpu)")
    return p


def main(argv: Sequence[str] | None = None, args: argparse.Namespace | None = None) -> int:
    """The command line; ``args`` comes parsed from ``rtenv bench table3``, which reports bad input itself."""
    if args is None:
        parser = build_parser()
        args = parser.parse_args(argv)
        try:
            return main(args=args)
        except (ValueError, OSError, BackendError) as e:  # unknown scenario or policy, bad counts, a missing
            parser.error(str(e))  # model, an unusable --out, a resume with other settings
    llm = LLMOptions(chain_of_thought=args.cot, memory_k=args.memory_k, action_scope=args.action_scope,
                     base_url=args.base_url, temperature=args.temperature)
    summary = run_table3(args.scenarios.split(","), args.policies.split(","), args.out, cases=args.cases,
                         max_steps=args.max_steps, seed=args.seed, knowledge=args.knowledge, llm=llm,
                         workers=args.workers, ray_address=False if args.ray is None else args.ray,
                         device=args.device)
    print(table_markdown(summary))
    print(f"wrote {Path(args.out) / 'results.jsonl'}, table3.md, summary.json and figures")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
