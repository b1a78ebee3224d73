"""Cost of one Adaptive epoch-end pruning event on LeNet-300-100, as
DKDPCallback makes it: scoring, the budget search to 10% of the parameters
and the event's mask writes, at weight or unit granularity, on a model
trained one epoch on random data. Median of 7 repeats, in one process.

    python benchmarks/event_cost.py weight|unit

To compare two versions of the library, run it with each on PYTHONPATH
(e.g. a `git worktree` of the older commit), alternating, on an idle
machine: benchmarks/RESULTS.md, 2026-12-01.
"""
import sys, time
import keras, numpy as np
import dkdp_keras as dkdp
from dkdp_keras import thresholds

granularity = sys.argv[1] if len(sys.argv) > 1 else "weight"
keras.utils.set_random_seed(0)
x = np.random.default_rng(0).random((512, 28, 28, 1)).astype("float32")
y = np.random.default_rng(1).integers(0, 10, 512)
model = dkdp.prunable(dkdp.zoo.lenet_300_100())
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(x, y, epochs=1, batch_size=128, verbose=0)
dense = dkdp.count_params(model, nonzero=False)
budget = dkdp.Budget(max_params=int(0.1 * dense))
cb = dkdp.DKDPCallback(granularity=granularity, verbose=0,
                       threshold=thresholds.Adaptive(budget))
cb.set_params({"epochs": 15, "steps": 4})
cb.set_model(model)
cb.on_train_begin()
cb.on_epoch_begin(0)
state = [l.kernel_mask.numpy().copy() for l in dkdp.masked_layers(model)]
times = []
for _ in range(7):
    for l, m in zip(dkdp.masked_layers(model), state):
        l.kernel_mask.assign(m)
    start = time.perf_counter()
    scores = cb._scores()
    required = cb._sparsity_for_budget(scores)
    cb._prune(0.5 * required + 0.25, scores)  # an event partway to the budget
    times.append(time.perf_counter() - start)
print(f"{granularity}: event {1000 * np.median(times):.1f} ms (median of 7; {sorted(round(1000*t,1) for t in times)})")
