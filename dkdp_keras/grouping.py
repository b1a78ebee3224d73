"""Unit pruning by channel group: what a structured prune can really remove.

A Dense/Conv unit can be removed only with every other member of its
`depgraph` group: the layers whose outputs a residual Add or a
squeeze-and-excite Multiply joins, and the depthwise convolutions that
carry the channels. `unit_entries` turns a teacher's masked layers into the
entries of a unit `MaskPool`: a layer alone where it is its group's only
member (as before groups existed), a `UnitGroup` where the group has
several, so that τ, floors and `unit_multiple` decide per group and the
masks of all members follow. Groups that no pruning can remove (read by a
model output, a layer the graph cannot see through or a plain
BatchNormalization, or produced by an unmasked layer:
`compaction.removable_groups`) are left out: pruning their units would
only zero weights that `compact` keeps.
"""

import numpy as np
from keras import ops

from dkdp_keras import depgraph
from dkdp_keras.compaction import removable_groups
from dkdp_keras.graph import is_masked
from dkdp_keras.thresholds.mechanism import PruningResult


class _Shape:
    def __init__(self, shape):
        self.shape = shape


class UnitGroup:
    """The channels of one group as one entry of a unit `MaskPool`.

    A channel's weights are those of all members (its size in the pool is
    their fan-ins summed), its score the mean over members of their unit
    scores, each divided by its mean (members' scores are on different
    scales), and it is kept where any member keeps it.
    """

    def __init__(self, members):
        self.members = members
        self.name = members[0].name
        self.num_units = members[0].num_units
        self.fans = [int(np.prod(m.kernel.shape)) // m.num_units for m in members]
        self.kernel = _Shape((sum(self.fans), self.num_units))

    @property
    def kernel_mask(self):
        alive = np.zeros(self.num_units, bool)
        for member in self.members:
            mask = ops.convert_to_numpy(member.kernel_mask).reshape(-1, self.num_units)
            alive |= mask.max(axis=0) > 0
        return np.broadcast_to(alive.astype("float32"), self.kernel.shape)

    def score(self, by_name):
        """The channels' scores from the members' unit scores (`by_name`:
        layer name -> scores)."""
        parts = []
        for member in self.members:
            s = np.asarray(by_name[member.name], "float64").reshape(-1)
            mean = float(np.mean(s))
            parts.append(s / mean if mean > 0 else s)
        return np.mean(parts, axis=0)

    def expand(self, mask):
        """Each member's kernel mask from this entry's (fan-in x units)."""
        keep = np.asarray(mask).reshape(-1, self.num_units).max(axis=0)
        return {
            m.name: np.broadcast_to(keep, (fan, self.num_units)).reshape(
                tuple(m.kernel.shape)).astype("float32")
            for m, fan in zip(self.members, self.fans)
        }


class UnitEntries:
    """The entries of a unit pool for `layers` of `teacher`, and the names
    of the layers no structured prune can shrink (`fixed`)."""

    def __init__(self, teacher, layers):
        graph = depgraph.of(teacher)
        by_id = {id(layer): layer for layer in layers}
        self.entries, self.fixed, seen = [], set(), set()
        group_of = {}
        removable = removable_groups(teacher)
        if graph.unsupported is None:
            for group in graph.roots():
                members = [n.op for n in graph.members(group)]
                for op in members:
                    group_of[id(op)] = (group, members)
        for layer in layers:
            if id(layer) in seen:
                continue
            if id(layer) not in group_of:
                self.entries.append(layer)  # not in any group the graph knows
                seen.add(id(layer))
                continue
            group, members = group_of[id(layer)]
            masked = [m for m in members if id(m) in by_id]
            seen.update(id(m) for m in masked)
            if group not in removable or len(masked) < len(members) or not all(
                    is_masked(m) for m in members):
                self.fixed.update(m.name for m in masked)
                self.entries.extend(masked)  # left in the pool, protected
            elif len(masked) == 1:
                self.entries.append(layer)
            else:
                self.entries.append(UnitGroup(masked))
        self.grouped = any(isinstance(e, UnitGroup) for e in self.entries)

    def scores(self, layers, scores):
        """Scores aligned with `entries` from scores aligned with `layers`."""
        by_name = {l.name: s for l, s in zip(layers, scores)}
        return [e.score(by_name) if isinstance(e, UnitGroup) else by_name[e.name]
                for e in self.entries]

    def expand(self, masks):
        """Masks of every layer from masks of the entries."""
        out = {}
        for entry in self.entries:
            if isinstance(entry, UnitGroup):
                out.update(entry.expand(masks[entry.name]))
            else:
                out[entry.name] = masks[entry.name]
        return out

    def expand_result(self, result):
        """`result` (of a pool of the entries) with every layer's mask."""
        if not self.grouped:
            return result
        masks = self.expand(result.masks)
        zeros = sum(int(m.size - np.count_nonzero(m)) for m in masks.values())
        total = sum(m.size for m in masks.values())
        return PruningResult(tau=result.tau, masks=masks,
                             sparsity=zeros / total if total else 0.0)
