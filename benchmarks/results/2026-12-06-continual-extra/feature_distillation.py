"""The feature-distillation experiment of 2026-12-06 (issue 24), not part
of the library: with feature-distillation.patch applied to
dkdp_keras/continual.py (a cosine "less-forget" term on the output layer's
input, teacher against previous, Hou et al. 2019), every continual fit of
benchmarks/continual_frontier.py's setting also trains the teacher on
lambda_feat * (1 - cos(f_previous(x), f_teacher(x))).

    git apply benchmarks/results/2026-12-06-continual-extra/feature-distillation.patch
    python benchmarks/results/2026-12-06-continual-extra/feature_distillation.py 0.5 0,1,2
    git checkout dkdp_keras/continual.py
    python benchmarks/continual_posthoc.py benchmarks/work/continual/logits-feat0.5 \
        benchmarks/results/2026-12-06-continual-extra/feature-distillation-0.5.jsonl
"""
import sys, json, pathlib, keras
BENCH = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(BENCH))
import continual_frontier as cf, continual as bench
import dkdp_keras as dkdp
from dkdp_keras import continual
lam = float(sys.argv[1]); seeds = [int(s) for s in sys.argv[2].split(",")]
orig = dkdp.DKDPModel.next_task
def view(net):
    return keras.Model(net.inputs, continual.output_layer(net).input)
def next_task(self, *a, **k):
    r = orig(self, *a, **k)
    self._feat_views = {"previous": view(self.previous), "teacher": view(self.teacher)}
    self.continual["lambda_feat"] = lam
    self.make_train_function(force=True)
    return r
dkdp.DKDPModel.next_task = next_task
settings = bench.FULL; d = bench.data(settings)
out = pathlib.Path(__file__).parent / f"feature-distillation-{lam:g}.jsonl"
for seed in seeds:
    rows = cf.run(seed, False, d, settings, cf.HERE / "work/continual/full", 1.0, str(BENCH / "work" / "continual" / f"logits-feat{lam:g}"))
    with open(out, "a") as f:
        f.writelines(json.dumps({**r, "lambda_feat": lam}) + "\n" for r in rows)
