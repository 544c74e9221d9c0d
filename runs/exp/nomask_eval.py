import sys, torch; torch.set_num_threads(1)
from drl.acer import ACER
from rtenv.rollout import evaluate_cohort
m = ACER.load(sys.argv[1], device="cpu")
def pol(o, i):
    return int(m.predict(o, deterministic=True)[0])
for c in ("test", "knowledge"):
    r = evaluate_cohort(pol, "S1", cohort=c)
    print(c, "unmasked predict:", round(r["final_score_mean"], 2), r["full_score_rate"], r["steps_mean"])
