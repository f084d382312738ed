"""Control knowledge: the same tables with their content taken away, to tell knowledge from capacity.

A knowledge-augmented model differs from its stock backbone in two ways at once: it has more
parameters and inputs, and those inputs carry the LLM's content. ``knowledge_control`` keeps the
first and removes the second, applied to the aligned tables a model reads (the store is untouched,
so a control run reuses the real run's store):

- ``shuffled``: every id gets another id's knowledge (one seeded permutation per side, shared by
  all of that side's kinds, so a user keeps one whole, wrong profile): same distribution, wrong owner;
- ``constant``: every id gets the mean vector: same parameters, no content.

The padding row 0 stays as it is.
"""

import numpy as np

CONTROLS = ("shuffled", "constant")
SIDE_STREAMS = {"user": 1, "item": 2}  # one random stream per side: kinds of a side move together


def apply_control(table, control, seed, side):
    """``table`` ([n_ids, dim], row 0 padding) under ``control`` (``None``: unchanged)."""
    if control is None:
        return table
    if control not in CONTROLS:
        raise ValueError(f"knowledge_control: '{control}' is not a control; choose one of {', '.join(CONTROLS)} "
                         f"or leave it empty (~) for the real knowledge")
    out = table.copy()
    if control == "shuffled":
        order = np.random.default_rng([int(seed), SIDE_STREAMS[side]]).permutation(len(table) - 1) + 1
        out[1:] = table[order]
    else:
        out[1:] = table[1:].mean(0)
    return out
