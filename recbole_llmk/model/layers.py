"""Layers shared by the knowledge-augmented models."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from recbole.model.layers import MLPLayers


class HEIN(nn.Module):
    """Hybridized expert integration network (KAR/REKI's knowledge adaptor).

    Shared experts see both user and item knowledge; dedicated experts see one side. Each side
    mixes its experts with a softmax gate over its knowledge vector and projects the mixture to
    ``output_dim``, giving the two augmented vectors. When the two sides' knowledge differs in
    width (e.g. REKI-C: a user has liked-cluster, disliked-cluster and history knowledge, an item
    cluster and description knowledge), each side is first projected to the narrower width so
    the shared experts see one space. ``precision`` is the dtype of the experts' first layers and
    the gates (``float32``, or ``bfloat16``: see ``expert_outputs``).
    """

    def __init__(self, user_dim, item_dim, output_dim, n_shared=2, n_user=2, n_item=2, hidden_sizes=(128, 32),
                 dropout=0.0, precision="float32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"hein_precision: '{precision}' is not one of {', '.join(PRECISIONS)}")
        self.first_layer_dtype = PRECISIONS[precision]
        input_dim = min(user_dim, item_dim)
        self.user_in = nn.Identity() if user_dim == input_dim else nn.Linear(user_dim, input_dim)
        self.item_in = nn.Identity() if item_dim == input_dim else nn.Linear(item_dim, input_dim)
        sizes = [input_dim, *hidden_sizes]

        def experts(n):
            return nn.ModuleList(MLPLayers(sizes, dropout, activation="relu") for _ in range(n))

        self.shared = experts(n_shared)
        self.user_experts = experts(n_user)
        self.item_experts = experts(n_item)
        self.user_gate = nn.Linear(input_dim, n_shared + n_user)
        self.item_gate = nn.Linear(input_dim, n_shared + n_item)
        self.user_out = nn.Linear(sizes[-1], output_dim)
        self.item_out = nn.Linear(sizes[-1], output_dim)

    @classmethod
    def from_config(cls, user_dim, item_dim, output_dim, config):
        """HEIN sized by the run's ``hein_*`` settings."""
        return cls(user_dim, item_dim, output_dim, config["hein_n_shared"], config["hein_n_user"], config["hein_n_item"],
                   config["hein_hidden_sizes"], config["hein_dropout"], config["hein_precision"])

    def _side(self, x, project, experts, gate, out):
        x = project(x)
        outputs, logits = expert_outputs(x, (*self.shared, *experts), gate, self.first_layer_dtype)  # [E, B, h], [B, E]
        return out(torch.einsum("be,ebh->bh", torch.softmax(logits, dim=-1), outputs))

    def user(self, knowledge):
        return self._side(knowledge, self.user_in, self.user_experts, self.user_gate, self.user_out)

    def item(self, knowledge):
        return self._side(knowledge, self.item_in, self.item_experts, self.item_gate, self.item_out)

    def forward(self, user_knowledge, item_knowledge):
        return self.user(user_knowledge), self.item(item_knowledge)


# HEIN's first-layer dtypes (hein_precision): None computes in the parameters' own dtype.
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


def expert_outputs(x, experts, gate, dtype=None):
    """Every expert MLP of one HEIN side on ``x``, and the side's gate logits, as batched ops:
    -> ``([E, B, h], [B, E])``.

    The parameters stay in the experts' own ``MLPLayers`` (so the backbone's ``_init_weights``
    initialises them as before and checkpoints keep their names); the computation stacks them:
    the first layers of all experts and the gate are one matrix product over ``x`` (they read the
    same input), each later layer one batched product. Equal to running the experts one by one
    (tests/test_reki.py checks outputs and gradients), with a few operations per layer instead of
    one per expert; the arithmetic is the same (what that costs: docs/performance.md).

    With ``dtype`` (bfloat16) the first layers and the gate, most of HEIN's arithmetic when the
    knowledge is wide (384 in, 128 out per expert), multiply in that dtype, forward and backward:
    the parameters and their gradients stay float32 (casts), and so does everything after them."""
    layers = [[m for m in e.mlp_layers if isinstance(m, nn.Linear)] for e in experts]
    dropout = experts[0].dropout
    first = [expert[0] for expert in layers]
    n, width = len(experts), first[0].out_features
    if dropout and experts[0].training:  # a mask of its own per expert, as one by one
        xs = F.dropout(x.unsqueeze(0).expand(n, *x.shape), dropout, True)
        weight = torch.stack([layer.weight for layer in first])
        bias = torch.stack([layer.bias for layer in first]).unsqueeze(1)
        hidden = torch.baddbmm(cast(bias, dtype), cast(xs, dtype), cast(weight, dtype).transpose(1, 2)).to(x.dtype)
        logits = F.linear(cast(x, dtype), cast(gate.weight, dtype), cast(gate.bias, dtype)).to(x.dtype)
    else:
        weight = torch.cat([*(layer.weight for layer in first), gate.weight])
        bias = torch.cat([*(layer.bias for layer in first), gate.bias])
        both = F.linear(cast(x, dtype), cast(weight, dtype), cast(bias, dtype)).to(x.dtype)
        hidden = both[:, :n * width].view(len(x), n, width).transpose(0, 1)
        logits = both[:, n * width:]
    hidden = torch.relu(hidden)
    for depth in range(1, len(layers[0])):
        if dropout:
            hidden = F.dropout(hidden, dropout, experts[0].training)
        weight = torch.stack([expert[depth].weight for expert in layers])
        bias = torch.stack([expert[depth].bias for expert in layers])
        hidden = torch.relu(torch.baddbmm(bias.unsqueeze(1), hidden, weight.transpose(1, 2)))
    return hidden, logits


def cast(tensor, dtype):
    """``tensor`` in ``dtype`` (None: as it is); the gradient flows back in the tensor's own dtype."""
    return tensor if dtype is None else tensor.to(dtype)


class HEINSide(nn.Module):
    """One side (``user``/``item``) of a HEIN, as a module: the adapter of that side's knowledge
    where it is fused into ID embeddings (the HEIN, shared by both sides, is trained with them)."""

    def __init__(self, hein, side):
        super().__init__()
        self.hein = hein
        self.side = side

    def forward(self, knowledge):
        return getattr(self.hein, self.side)(knowledge)


def per_unique_id(side, table, ids):
    """``side(table[ids])``, computed once per distinct id: a batch repeats users and items many
    times and their knowledge depends on the id alone, so this is exact and much cheaper."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    return side(table[unique])[inverse]


class KnowledgeFields(nn.Module):
    """Two extra feature fields per interaction: the augmented user and item vectors.

    Knowledge vectors come from the store, aligned to internal ids; they are buffers (not saved
    in checkpoints: the store is their source). ``prestore()`` runs HEIN once over every id so
    inference costs one lookup, as REKI deploys it; ``prestore(drop_adapter=True)`` then serves
    without HEIN at all.
    """

    def __init__(self, user_table, item_table, output_dim, config):
        super().__init__()
        self.register_buffer("user_knowledge", torch.as_tensor(user_table), persistent=False)
        self.register_buffer("item_knowledge", torch.as_tensor(item_table), persistent=False)
        self.hein = HEIN.from_config(user_table.shape[1], item_table.shape[1], output_dim, config)
        self.prestored = False

    def forward(self, user, item):
        if self.prestored:
            return torch.stack([self.user_augmented[user], self.item_augmented[item]], dim=1)
        user_vec = per_unique_id(self.hein.user, self.user_knowledge, user)
        item_vec = per_unique_id(self.hein.item, self.item_knowledge, item)
        return torch.stack([user_vec, item_vec], dim=1)  # [B, 2, output_dim]

    def prestore(self, drop_adapter=False):
        for side, table in (("user", self.user_knowledge), ("item", self.item_knowledge)):
            adapter = HEINSide(self.hein, side).train(self.hein.training)  # its mode is kept
            self.register_buffer(f"{side}_augmented", adapted_once(adapter, table))
        self.prestored = True
        if drop_adapter:
            del self.hein, self.user_knowledge, self.item_knowledge


class ConcatInput(nn.Module):
    """Appends the current batch's knowledge fields to the input of a widened module.

    Used where a backbone builds its final MLP input inside ``forward`` (DIN, DIEN): the model
    sets ``fields`` for the batch before calling the backbone's forward.
    """

    def __init__(self, inner, extra_dim):
        super().__init__()
        widen_first_linear(inner, extra_dim)
        self.inner = inner
        self.fields = None

    def forward(self, x):
        if self.fields is None:
            raise RuntimeError("knowledge fields were not set for this batch")
        return self.inner(torch.cat([x, self.fields.flatten(1)], dim=-1))


def widen_first_linear(module, extra_dim):
    """Give ``module``'s first Linear ``extra_dim`` more inputs, keeping its existing weights."""
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Linear):
            wider = nn.Linear(layer.in_features + extra_dim, layer.out_features, bias=layer.bias is not None)
            nn.init.xavier_normal_(wider.weight)
            with torch.no_grad():
                wider.weight[:, :layer.in_features] = layer.weight
                if layer.bias is not None:
                    wider.bias.copy_(layer.bias)
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(parent, name.rpartition(".")[2], wider)
            return
    raise ValueError(f"{type(module).__name__} has no Linear layer to widen")


class AttentionFusion(nn.Module):
    """ReLand's fusion of an embedding ``e`` with a knowledge vector ``t`` (the paper's user side):
    ``z = Linear(t)``, ``(a1, a2) = softmax(e·w, z·w)`` with one learned ``w``, ``e' = a1 e + a2 z``.

    It starts near a 50/50 mix of ``e`` and a random projection of ``t``, so at initialisation it
    is worse than the ID embedding alone and only half of each gradient reaches the ID rows.
    ``e`` may carry extra leading dimensions (e.g. every position of a sequence); ``t`` is
    broadcast over them, as in every fusion here."""

    def __init__(self, dim, knowledge_dim):
        super().__init__()
        self.project = nn.Linear(knowledge_dim, dim)
        self.score = nn.Linear(dim, 1, bias=False)

    def weights(self, e, z):
        return torch.softmax(torch.cat([self.score(e), self.score(z)], dim=-1), dim=-1)

    def forward(self, e, t):
        z = _broadcast(self.project(t), e)
        a = self.weights(e, z)
        return a[..., :1] * e + a[..., 1:] * z


class GatedFusion(nn.Module):
    """``e' = e + g ⊙ Linear(t)`` with a per-dimension gate ``g`` that starts at zero.

    At initialisation ``e' = e``: the model is exactly its ID-only self, every gradient reaches
    the ID rows whole, and the knowledge enters only as far as training opens the gate (``g``'s
    gradient is ``Linear(t) ⊙ ∂L/∂e'``, non-zero from the first step)."""

    def __init__(self, dim, knowledge_dim):
        super().__init__()
        self.project = nn.Linear(knowledge_dim, dim)
        self.gate = nn.Parameter(torch.zeros(dim))

    def forward(self, e, t):
        return e + self.gate * _broadcast(self.project(t), e)


class ConcatFusion(nn.Module):
    """ReLand's "+f_item" as the paper writes it: the ID embedding concatenated with the feature
    representation, ``e' = W [e; t] + b``, projected back to the model's dimension (every RecBole
    model scores in it). ``W`` starts as ``[I | 0]`` and ``b`` at zero, so at initialisation
    ``e' = e`` and the ID rows get their whole gradient."""

    def __init__(self, dim, knowledge_dim):
        super().__init__()
        self.project = nn.Linear(dim + knowledge_dim, dim)
        with torch.no_grad():
            self.project.weight.zero_()
            self.project.weight[:, :dim] = torch.eye(dim)
            self.project.bias.zero_()

    def forward(self, e, t):
        return self.project(torch.cat([e, _broadcast(t, e)], dim=-1))


def _broadcast(z, e):
    """``z`` ([B, d]) repeated over ``e``'s extra leading dimensions (e.g. sequence positions)."""
    while z.dim() < e.dim():
        z = z.unsqueeze(-2)
    return z.expand(*e.shape[:-1], z.shape[-1])


FUSIONS = {"attention": AttentionFusion, "gate": GatedFusion, "concat": ConcatFusion}


def make_fusion(kind, dim, knowledge_dim, setting):
    """The fusion named ``kind`` (a value of the yaml ``setting``)."""
    if kind not in FUSIONS:
        raise ValueError(f"{setting}: '{kind}' is not a fusion; choose one of {', '.join(FUSIONS)}")
    return FUSIONS[kind](dim, knowledge_dim)


@torch.no_grad()
def adapted_once(adapter, table, chunk=65536):
    """``adapter(table)`` in eval mode, the adapter's mode kept, ``chunk`` rows at a time (a table
    of millions of ids never makes the adapter's hidden layers whole): the table served after
    prestoring."""
    was_training = adapter.training
    adapter.eval()
    try:
        return torch.cat([adapter(table[start:start + chunk]) for start in range(0, len(table), chunk)])
    finally:
        adapter.train(was_training)


def adapted(adapter, table, ids):
    """``table[ids]``, through ``adapter`` (once per distinct id) when there is one."""
    return table[ids] if adapter is None else per_unique_id(adapter, table, ids)


class FusedEmbedding(nn.Module):
    """An ID embedding table whose rows are fused with fixed knowledge vectors by ``fusion``
    (one of :data:`FUSIONS`, built for the table's dimension and the knowledge's), after a trained
    ``adapter`` when there is one (e.g. a :class:`HEINSide`; run once per distinct id).

    A drop-in for the ``nn.Embedding`` it wraps, in the two ways RecBole models use one: called
    with ids, or read whole through ``.weight`` (graph propagation, full-sort scoring). Both give
    the fused rows, so every path through the model, evaluation included, sees the knowledge.
    The padding row is not fused (it carries no id). Knowledge rows beyond the table (e.g. BERT4Rec's mask token)
    are zero."""

    def __init__(self, embedding, knowledge, fusion, adapter=None):
        super().__init__()
        self.embedding = embedding
        rows = torch.zeros(embedding.num_embeddings, knowledge.shape[1])
        n = min(len(knowledge), embedding.num_embeddings)
        rows[:n] = torch.as_tensor(knowledge[:n])
        self.register_buffer("knowledge", rows, persistent=False)
        self.fusion = fusion
        self.adapter = adapter
        self._evaluated = None  # (state of the weights it was computed from, the fused table)

    @property
    def num_embeddings(self):
        return self.embedding.num_embeddings

    @property
    def embedding_dim(self):
        return self.embedding.embedding_dim

    @property
    def padding_idx(self):
        return self.embedding.padding_idx

    def _fuse(self, rows, ids):
        fused = self.fusion(rows, adapted(self.adapter, self.knowledge, ids))
        if self.padding_idx is not None:  # the padding row is the table's own, as in the stock model
            fused = torch.where((ids == self.padding_idx).unsqueeze(-1), rows, fused)
        return fused

    def forward(self, ids):
        return self._fuse(self.embedding(ids), ids)

    @torch.no_grad()
    def prestore(self):
        """Run the adapter once over every row and serve its output (REKI's deployment)."""
        if self.adapter is not None:
            self.knowledge, self.adapter = adapted_once(self.adapter, self.knowledge), None
        self._evaluated = None

    @property
    def weight(self):
        """The whole fused table. Full-sort evaluation reads it for every batch: there (evaluation
        mode, no gradients) it is computed once and kept until a weight it depends on changes (a
        training step, a loaded checkpoint: tracked by each tensor's version counter and storage)."""
        if self.training or torch.is_grad_enabled():
            return self._whole_table()
        # every parameter and buffer below this one: a table another technique fused is one of them
        state = tuple((id(t), t._version, t.data_ptr()) for t in (*self.parameters(), *self.buffers()))
        if self._evaluated is None or self._evaluated[0] != state:
            self._evaluated = (state, self._whole_table())
        return self._evaluated[1]

    def _whole_table(self):
        return self._fuse(self.embedding.weight, torch.arange(self.num_embeddings, device=self.knowledge.device))
