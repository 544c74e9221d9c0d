"""Experiment runner: train ACER variant briefly, evaluate on S1 test cohort."""
import argparse, json, time, collections
import numpy as np, torch
torch.set_num_threads(1)
from drl.acer import ACER
from drl.train import PLANNER_SETTINGS, as_policy, make_train_env
from rtenv.sb3 import make_sb3_vec_env
from rtenv.rollout import evaluate_cohort

p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--steps", type=int, default=30000)
p.add_argument("--start", default="default")
p.add_argument("--envs", type=int, default=16)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--kw", default="{}")
p.add_argument("--env-kw", default="{}")
a = p.parse_args()
kw = {**PLANNER_SETTINGS, **json.loads(a.kw)}
envkw = json.loads(a.env_kw)
venv = make_train_env("S1", a.envs, 1, start=a.start, **envkw)
venv.seed(a.seed)
model = ACER("MlpPolicy", venv, seed=a.seed, device="cpu", **kw)
t0 = time.time()
evals = []
def ev():
    acts = collections.Counter()
    pol = as_policy(model)
    def wrapped(o, i):
        x = pol(o, i); acts[int(x)] += 1; return x
    r = evaluate_cohort(wrapped, "S1", cohort="test", **envkw)
    return dict(steps=model.num_timesteps, t=round(time.time()-t0), fs=round(r["final_score_mean"],2), sd=round(r["final_score_sd"],2),
                full=r["full_score_rate"], st=r["steps_mean"], bin=round(r["final_binary_score_mean"],2), acts=dict(acts.most_common(5)))
chunk = a.steps // 3
for k in range(3):
    model.learn(chunk, reset_num_timesteps=(k == 0))
    e = ev(); e["ep_rew"] = float(np.mean([x["r"] for x in model.ep_info_buffer])) if model.ep_info_buffer else None
    e["ep_len"] = float(np.mean([x["l"] for x in model.ep_info_buffer])) if model.ep_info_buffer else None
    print(json.dumps(e), flush=True)
    evals.append(e)
model.save(f"runs/exp/{a.name}.zip")
json.dump({"args": vars(a), "evals": evals}, open(f"runs/exp/{a.name}.json", "w"))
from drl.acer import ACER as _A
m = _A.load(f"runs/exp/{a.name}.zip", device="cpu")
def pol(o, i):
    return int(m.predict(o, deterministic=True)[0])
r = evaluate_cohort(pol, "S1", cohort="test")
print("unmasked predict test:", round(r["final_score_mean"], 2), r["full_score_rate"], r["steps_mean"], flush=True)
