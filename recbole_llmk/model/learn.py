r"""LEARN: frozen-LLM item content embeddings adapted to recommendation by twin towers.

Reference:
    Jian Jia et al. "LEARN: Knowledge Adaptation from Large Language Model to Recommendation for
    Practical Industrial Application." AAAI 2025.

Content embedding generation (CEG, ``techniques.learn``): a frozen LLM (``text_encoder``) encodes
every item's description once; the vectors are a frozen buffer indexed by RecBole's item id.

Preference comprehension (PCH, this file): a content projection, learned position embeddings and
an N-layer *causal* transformer (RecBole's ``TransformerEncoder``, masked as in SASRec), followed
by a linear head to ``embedding_size``. The user tower runs over a user's history; its output at
every position is the user embedding "after the first i items". The item tower (``item_tower``):

1. the same tower and weights over the user's target items, causal (the default);
2. the same tower where each target item attends only to itself, at position 0 -- exactly what
   the tower gives a length-1 sequence, so training and evaluation embed items identically;
3. the content embedding itself, unchanged. The user head then outputs the content dimension
   (``embedding_size`` is not used) so that users and items share the content space.

Training samples (``training_samples``). RecBole's training rows for sequential models are
``(user, item_seq, target)`` built from the training split only (``item_seq`` holds the training
items before ``target``, oldest first). Each row is read as one time window of its user,
``item_seq + [target]``, split by time into a history (at most ``learn_history_len`` = H items) and
the targets that follow it (at most ``learn_target_len`` = T items; short windows keep the H:T
ratio, with at least one of each). Windows are at most ``MAX_ITEM_LIST_LENGTH + 1`` long. No
valid/test interaction exists in these rows, so none can become a history or a target.
RecBole has one row per training interaction, and neighbouring rows' windows overlap, so using every
row would make each interaction a target about T times per epoch; each row is therefore kept with
probability ``learn_window_rate`` (default 1/T: each interaction is a target about once per epoch,
like SASRec's epoch). Of the kept rows a batch keeps one per user (the loader shuffles, so that is
a random window), so another window of the same user can never be its negative. The loss costs
``O((users per batch)^2 * H * T)``: ``train_batch_size * learn_window_rate`` sets the users per step.
"About once" is in expectation over rows whose windows have T targets; a short window has fewer
(on Amazon Beauty 54 % of windows had one target, and an epoch made 0.27 of SASRec's targets).

``learn_windows: tiled`` trains on the whole training split instead: the model keeps every
user's training sequence (rebuilt from RecBole's rows, ``training_sequences``) and each epoch cuts
it into consecutive target chunks of T (the first 1..T long, drawn anew each epoch) with the H
items before each as history, so every training interaction but a user's first is a target
exactly once per epoch. The epoch's windows, in random order, are spread evenly over RecBole's
batches (whose rows then only pace the steps); two windows of one user in a step are never each
other's negatives. ``sampled`` stays the default until a benchmark compares them.

Loss (LEARN Eq. 1, dense all-action InfoNCE): every history position's user embedding is scored
against every target of the same user as a positive; the negatives are the other users' targets
in the batch (minus any item that is also one of the user's own targets), with temperature
``tau``. ``learn_similarity: cos`` L2-normalises both embeddings first; ``dot`` uses them as they are.
``learn_logq: True`` subtracts each item's log training frequency from its scores (logQ correction:
in-batch negatives are drawn by popularity).

Evaluation: the user embedding is the tower's output at the last position of the user's last H
items (``item_seq``); each item is embedded from its content alone (variants 1 and 2: the tower
over a length-1 sequence of that item), so items with no interactions are ranked by their text.
Item tower 1 cannot be evaluated as it is trained: in training a target's embedding depends on the
targets before it in the window, and a candidate item at ranking time has no such context, so it
is embedded alone (what tower 2 trains for; the paper serves its item embeddings per item too).
``full_sort_predict`` scores every item, and RecBole's full-sort evaluator ranks them.
"""

import logging
import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.model.layers import TransformerEncoder
from recbole.utils import InputType
from torch import nn

from recbole_llmk.knowledge.store import KnowledgeStore, pca_reduce, run_table
from recbole_llmk.model.knowledge_fields import KnowledgeMixin, knowledge_variant
from recbole_llmk.model.technique import KnowledgeTechnique, built_store_path

MASKED = -10000.0  # RecBole's additive attention mask value
ITEM_TOWERS = (1, 2, 3)
WINDOWS = ("sampled", "tiled")
SIMILARITIES = ("cos", "dot")


def content_table(config, dataset):
    """The LEARN store's item vectors as ``[n_items, dim]``, row = internal item id, row 0 zero."""
    store = KnowledgeStore.open(built_store_path(config, "LEARN"))
    store.check({"technique": "LEARN", "dataset": config["dataset"], "encoder": config["text_encoder"]})
    table = run_table(store, config, dataset, "item", "item")
    if config["knowledge_pca_dim"]:
        table = pca_reduce([table], config["knowledge_pca_dim"])[0]
    return torch.from_numpy(table)


def causal_mask(valid):
    """Additive ``[B, 1, L, L]`` mask: position i sees the valid positions j <= i (as SASRec)."""
    keys = valid.unsqueeze(1).unsqueeze(2).expand(-1, -1, valid.size(1), -1)
    return torch.where(torch.tril(keys), 0.0, MASKED)


def self_mask(valid):
    """Additive ``[B, 1, L, L]`` mask: every position sees only itself."""
    eye = torch.eye(valid.size(1), dtype=torch.bool, device=valid.device)
    return torch.where(eye, 0.0, MASKED).expand(valid.size(0), 1, -1, -1)


def last_items(seq, seq_len, length):
    """The last ``length`` items of left-aligned sequences, left-aligned, zero-padded; and their
    count."""
    count = seq_len.clamp(max=length)
    start = (seq_len - count).unsqueeze(1)
    offsets = torch.arange(length, device=seq.device).unsqueeze(0)
    index = (start + offsets).clamp(max=seq.size(1) - 1)
    valid = offsets < count.unsqueeze(1)
    return torch.where(valid, seq.gather(1, index), torch.zeros_like(index)), count


def first_row_per_user(users):
    """Index of the first row of every distinct user in ``users``."""
    distinct, inverse = torch.unique(users, return_inverse=True)
    rows = torch.arange(len(users), device=users.device)
    first = torch.full((len(distinct),), len(users), dtype=torch.long, device=users.device)
    return first.scatter_reduce(0, inverse, rows, reduce="amin")


def split_window(seq, seq_len, target, history_len, target_len):
    """Each row's window ``seq[:seq_len] + [target]`` split by time into history and targets.

    Returns ``(history [R, H], history_count [R], targets [R, T], target_count [R])``, left-aligned
    and zero-padded. A window of n items gets ``t = clamp(n*T // (H+T), 1, min(T, n-1))`` targets
    (the last ones) and the ``h = min(H, n-t)`` items just before them as history."""
    window = torch.cat([seq, torch.zeros_like(seq[:, :1])], dim=1)
    window.scatter_(1, seq_len.unsqueeze(1), target.unsqueeze(1))
    n = seq_len + 1
    t = (n * target_len // (history_len + target_len)).clamp(min=1)
    t = torch.minimum(t, (n - 1).clamp(max=target_len))
    h = torch.minimum(n - t, torch.full_like(n, history_len))
    history = _slice(window, n - t - h, h, history_len)
    targets = _slice(window, n - t, t, target_len)
    return history, h, targets, t


def _slice(window, start, count, width):
    offsets = torch.arange(width, device=window.device).unsqueeze(0)
    index = (start.unsqueeze(1) + offsets).clamp(max=window.size(1) - 1)
    valid = offsets < count.unsqueeze(1)
    return torch.where(valid, window.gather(1, index), torch.zeros_like(index))


def training_sequences(dataset, item_seq_field, item_len_field):
    """``[(user, training items oldest first)]`` from RecBole's augmented training rows (one per
    target, in time order within a user): the first row's history, then every row's target. Each
    row's history must end with the previous row's target, or the rows are not what RecBole's
    ``data_augmentation`` writes and this is an error."""
    inter = dataset.inter_feat
    users = inter[dataset.uid_field].numpy()
    targets = inter[dataset.iid_field].numpy()
    histories, lengths = inter[item_seq_field].numpy(), inter[item_len_field].numpy()
    order = np.argsort(users, kind="stable")
    users, targets, histories, lengths = users[order], targets[order], histories[order], lengths[order]
    last_of_history = histories[np.arange(len(order)), np.maximum(lengths - 1, 0)]
    same_user = users[1:] == users[:-1]
    if (same_user & (last_of_history[1:] != targets[:-1])).any():
        raise ValueError("learn_windows=tiled: the training rows of a user do not chain (each history ending "
                         "with the previous target); use learn_windows=sampled")
    starts = np.flatnonzero(np.r_[True, ~same_user])
    ends = np.r_[starts[1:], len(users)]
    return [(int(users[a]), np.concatenate([histories[a, :lengths[a]], targets[a:b]])) for a, b in zip(starts, ends)]


def tiled_windows(sequences, history_len, target_len):
    """One epoch's windows: every training interaction but a user's first is a target exactly once.

    A user's targets are cut into consecutive chunks of ``target_len`` (the first chunk 1 to
    ``target_len`` long, drawn from torch's generator, so the cuts move between epochs), each with
    the ``history_len`` items before it as its history. Returns ``(owners [W], history [W, H],
    targets [W, T])``, left-aligned, zero-padded, in a random order."""
    firsts = torch.randint(1, target_len + 1, (len(sequences),)).tolist()
    owners, histories, targets = [], [], []
    for (user, items), size in zip(sequences, firsts):
        start = 1
        while start < len(items):
            end = min(start + size, len(items))
            owners.append(user)
            histories.append(items[max(0, start - history_len):start])
            targets.append(items[start:end])
            start, size = end, target_len
    order = torch.randperm(len(owners)).tolist()
    return (torch.tensor([owners[i] for i in order], dtype=torch.long),
            padded([histories[i] for i in order], history_len), padded([targets[i] for i in order], target_len))


def padded(rows, width):
    out = np.zeros((len(rows), width), dtype=np.int64)
    for r, items in enumerate(rows):
        out[r, :len(items)] = items
    return torch.from_numpy(out)


def all_action_infonce(user_emb, user_valid, item_emb, item_ids, item_valid, tau, owners=None, log_q=None):
    """LEARN's dense all-action InfoNCE over a batch of users.

    ``user_emb [U, H, d]`` (history positions, ``user_valid [U, H]``), ``item_emb [U, T, d]``
    (targets, ids ``item_ids [U, T]``, ``item_valid [U, T]``). For user u, valid position i and
    valid target j: ``-log(e^{s(u_i, e_uj)} / (e^{s(u_i, e_uj)} + sum_neg e^{s(u_i, e_neg)}))`` with
    ``s = <., .> / tau``; the negatives are the valid targets of the other users whose item is not
    one of u's own targets. Averaged over all (u, i, j) triples. ``owners [U]`` (default: every
    row its own user) names each row's user: rows of one user are never each other's negatives.
    ``log_q [n_items]`` (optional) is the log-probability of an item appearing as an in-batch
    target; subtracting it from every score (positive and negatives) is the logQ correction of
    sampled softmax, so popular items are not pushed down for being everyone's negative. The denominator's negative part
    does not depend on j, so it is one log-sum-exp per position and the loss is
    ``softplus(N_ui - s_uij)``."""
    n_users, n_targets, dim = item_emb.shape
    user_emb = user_emb / tau  # scale the small tensor, not the [U, H, U*T] scores
    positive = torch.einsum("uhd,utd->uht", user_emb, item_emb)
    all_scores = torch.einsum("uhd,kd->uhk", user_emb, item_emb.reshape(-1, dim))
    if log_q is not None:
        positive = positive - log_q[item_ids].unsqueeze(1)
        all_scores = all_scores - log_q[item_ids.reshape(-1)].view(1, 1, -1)
    if owners is None:
        owners = torch.arange(n_users, device=item_ids.device)
    owner = owners.repeat_interleave(n_targets)
    flat_ids, flat_valid = item_ids.reshape(-1), item_valid.reshape(-1)
    own_item = ((item_ids.unsqueeze(2) == flat_ids.view(1, 1, -1)) & item_valid.unsqueeze(2)).any(1)
    others = owner.unsqueeze(0) != owners.unsqueeze(1)
    negative = flat_valid.unsqueeze(0) & others & ~own_item  # [U, U*T]
    all_scores = all_scores.masked_fill(~negative.unsqueeze(1), float("-inf"))
    negatives = torch.logsumexp(all_scores, dim=-1)  # [U, H]; -inf when there is none
    losses = F.softplus(negatives.unsqueeze(2) - positive)
    pairs = user_valid.unsqueeze(2) & item_valid.unsqueeze(1)
    return losses[pairs].mean()


class PreferenceTower(nn.Module):
    """LEARN's PCH tower: content projection + positions -> transformer -> linear head."""

    def __init__(self, content_dim, out_dim, config, n_positions):
        super().__init__()
        hidden = config["hidden_size"]
        self.content_proj = nn.Linear(content_dim, hidden)
        self.position_embedding = nn.Embedding(n_positions, hidden)
        self.layer_norm = nn.LayerNorm(hidden, eps=config["layer_norm_eps"])
        self.dropout = nn.Dropout(config["hidden_dropout_prob"])
        self.encoder = TransformerEncoder(
            n_layers=config["n_layers"], n_heads=config["n_heads"], hidden_size=hidden,
            inner_size=config["inner_size"], hidden_dropout_prob=config["hidden_dropout_prob"],
            attn_dropout_prob=config["attn_dropout_prob"], hidden_act=config["hidden_act"],
            layer_norm_eps=config["layer_norm_eps"])
        self.head = nn.Linear(hidden, out_dim)

    def forward(self, content, attention_mask, position_ids):
        """``content [B, L, c]``, additive ``attention_mask [B, 1, L, L]``, ``position_ids [B|1, L]``
        -> ``[B, L, out_dim]``."""
        hidden = self.content_proj(content) + self.position_embedding(position_ids)
        hidden = self.dropout(self.layer_norm(hidden))
        hidden = self.encoder(hidden, attention_mask, output_all_encoded_layers=False)[-1]
        return self.head(hidden)


class LEARN(KnowledgeTechnique, SequentialRecommender):
    r"""LEARN (Jia et al., AAAI 2025): a frozen LLM's item content embeddings, adapted by a causal
    transformer user tower and an item tower trained with dense all-action InfoNCE. See the module
    docstring for the towers, the training samples and the evaluation."""

    input_type = InputType.POINTWISE
    store_technique = "LEARN"

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.history_len = int(config["learn_history_len"])
        self.target_len = int(config["learn_target_len"])
        self.item_tower = int(config["item_tower"])
        self.tau = float(config["tau"])
        self.similarity = config["learn_similarity"]
        rate = config["learn_window_rate"]
        self.window_rate = 1.0 / self.target_len if rate is None else float(rate)
        self.windows = config["learn_windows"]
        self._check_settings()
        if config["learn_logq"]:  # in-batch targets follow the training split's item frequencies
            counts = np.bincount(dataset.inter_feat[self.POS_ITEM_ID].numpy(), minlength=self.n_items)
            self.register_buffer("log_q", torch.log(torch.from_numpy(counts).float().clamp(min=1) / counts.sum()),
                                 persistent=False)
        else:
            self.log_q = None
        if self.windows == "tiled":
            self.sequences = training_sequences(dataset, self.ITEM_SEQ, self.ITEM_SEQ_LEN)
            self.batches_per_epoch = max(1, math.ceil(len(dataset) / config["train_batch_size"]))
            self._epoch_windows, self._step = None, 0
        # frozen CEG output; rebuilt from the store, so checkpoints do not carry it (as REKI)
        self.register_buffer("content", content_table(config, dataset), persistent=False)
        out_dim = self.content.shape[1] if self.item_tower == 3 else config["embedding_size"]
        self.tower = PreferenceTower(self.content.shape[1], out_dim, config,
                                     max(self.history_len, self.target_len))
        self.initializer_range = config["initializer_range"]
        self.apply(self._init_weights)
        self._item_cache = None

    def _check_settings(self):
        if self.windows not in WINDOWS:
            raise ValueError(f"learn_windows must be one of {WINDOWS}, got '{self.windows}'")
        if self.item_tower not in ITEM_TOWERS:
            raise ValueError(f"item_tower must be one of {ITEM_TOWERS}, got {self.item_tower}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"learn_similarity must be one of {SIMILARITIES}, got '{self.similarity}'")
        if self.history_len < 1 or self.target_len < 1 or self.tau <= 0 or not 0 < self.window_rate <= 1:
            raise ValueError("learn_history_len and learn_target_len must be >= 1, tau > 0 and "
                             f"0 < learn_window_rate <= 1, got {self.history_len}, {self.target_len}, "
                             f"{self.tau}, {self.window_rate}")
        if self.max_seq_length + 1 < self.history_len + self.target_len:
            logging.getLogger().warning(
                f"LEARN: MAX_ITEM_LIST_LENGTH={self.max_seq_length} gives training windows of at most "
                f"{self.max_seq_length + 1} items, fewer than learn_history_len + learn_target_len = "
                f"{self.history_len + self.target_len}; raise MAX_ITEM_LIST_LENGTH for full windows.")

    def _init_weights(self, module):
        """As SASRec: normal(0, initializer_range) weights, zero biases, unit LayerNorm."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=self.initializer_range)
        elif isinstance(module, nn.LayerNorm):
            module.bias.data.zero_()
            module.weight.data.fill_(1.0)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()

    @classmethod
    def knowledge_plan(cls, config, dataset):
        """The CEG store of item content embeddings, built before the model."""
        from recbole_llmk.techniques.learn import learn_plan

        return learn_plan(config, dataset)

    def train(self, mode=True):
        self._item_cache = None  # item embeddings change with the weights
        if mode and self.windows == "tiled":
            self._epoch_windows = None  # RecBole's trainer calls train() as each epoch starts
        return super().train(mode)

    def load_state_dict(self, state_dict, *args, **kwargs):
        self._item_cache = None
        return super().load_state_dict(state_dict, *args, **kwargs)

    # --- towers ---------------------------------------------------------------------------------

    def _positions(self, length):
        return torch.arange(length, device=self.content.device).unsqueeze(0)

    def user_tower(self, history):
        """``history [B, L]`` (left-aligned item ids, 0 = padding) -> ``[B, L, d]``: the user
        embedding after each prefix of the history."""
        return self.tower(self.content[history], causal_mask(history > 0), self._positions(history.size(1)))

    def target_tower(self, targets):
        """``targets [B, T]`` -> ``[B, T, d]`` item embeddings as trained (``item_tower``)."""
        if self.item_tower == 3:
            return self.content[targets]
        if self.item_tower == 1:
            return self.tower(self.content[targets], causal_mask(targets > 0), self._positions(targets.size(1)))
        zeros = torch.zeros_like(self._positions(targets.size(1)))
        return self.tower(self.content[targets], self_mask(targets > 0), zeros)

    def item_embeddings(self):
        """``[n_items, d]``: every item embedded from its content alone (row 0 is padding)."""
        if self.item_tower == 3:
            return self.content
        if self._item_cache is not None and not self.training:
            return self._item_cache
        items = torch.arange(self.n_items, device=self.content.device).unsqueeze(1)
        embeddings = self.tower(self.content[items], self_mask(items > 0), self._positions(1)).squeeze(1)
        if not self.training:
            self._item_cache = embeddings
        return embeddings

    def _space(self, embeddings):
        return F.normalize(embeddings, dim=-1) if self.similarity == "cos" else embeddings

    # --- RecBole interface ----------------------------------------------------------------------

    def forward(self, item_seq, item_seq_len):
        """User embedding ``[B, d]``: the tower's output at the last of the user's last H items."""
        history, count = last_items(item_seq, item_seq_len, self.history_len)
        return self.gather_indexes(self.user_tower(history), (count - 1).clamp(min=0))

    def training_samples(self, interaction):
        """``(users, history, history_count, targets, target_count)`` from a training batch: one
        time window per distinct user among the rows kept (see the module docstring)."""
        rows = self._sampled_rows(len(interaction))
        rows = rows[first_row_per_user(interaction[self.USER_ID][rows])]
        history, h, targets, t = split_window(
            interaction[self.ITEM_SEQ][rows], interaction[self.ITEM_SEQ_LEN][rows],
            interaction[self.POS_ITEM_ID][rows], self.history_len, self.target_len)
        return interaction[self.USER_ID][rows], history, h, targets, t

    def _sampled_rows(self, n_rows):
        """Each row kept with probability ``learn_window_rate`` (at least one row is kept)."""
        rows = torch.arange(n_rows, device=self.content.device)
        if self.window_rate >= 1.0:
            return rows
        kept = rows[torch.rand(n_rows, device=rows.device) < self.window_rate]
        return kept if len(kept) else rows[:1]

    def tiled_samples(self):
        """``(owners, history, targets)``: this step's share of the epoch's tiled windows (the
        batch's rows only say that a step is due: every user's windows come from its sequence)."""
        if self._epoch_windows is None:
            self._epoch_windows, self._step = tiled_windows(self.sequences, self.history_len, self.target_len), 0
        owners, history, targets = self._epoch_windows
        per_step = math.ceil(len(owners) / self.batches_per_epoch)
        rows = slice(self._step * per_step, (self._step + 1) * per_step)
        self._step += 1
        if self._step >= self.batches_per_epoch:
            self._epoch_windows = None
        device = self.content.device
        return owners[rows].to(device), history[rows].to(device), targets[rows].to(device)

    def calculate_loss(self, interaction):
        if self.windows == "tiled":
            owners, history, targets = self.tiled_samples()
        else:
            owners, (_, history, _, targets, _) = None, self.training_samples(interaction)
        users = self._space(self.user_tower(history))
        items = self._space(self.target_tower(targets))
        return all_action_infonce(users, history > 0, items, targets, targets > 0, self.tau, owners, self.log_q)

    def predict(self, interaction):
        users = self._space(self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]))
        items = self._space(self.item_embeddings()[interaction[self.ITEM_ID]])
        return (users * items).sum(-1)

    def full_sort_predict(self, interaction):
        users = self._space(self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN]))
        return users @ self._space(self.item_embeddings()).T


# --- <Model>_LEARN ----------------------------------------------------------------------------------
class LEARNFeatures(KnowledgeMixin):
    """``<Model>_LEARN``'s knowledge: LEARN's user and item embeddings, built before the model
    (``techniques.learn.learn_features_plan``) and fed through HEIN as two extra fields, the
    injection REKI uses (``model.knowledge_fields``)."""

    technique = "LEARN"
    store_technique = "LEARN-features"

    @classmethod
    def knowledge_plan(cls, config, dataset):
        from recbole_llmk.techniques.learn import learn_features_plan

        return learn_features_plan(config, dataset)


@lru_cache(maxsize=None)
def learn_variant(base):
    """``<Base>_LEARN`` for a RecBole CTR model class."""
    doc = f"{base.__name__} with LEARN user and item embeddings as two knowledge fields (through HEIN)."
    return knowledge_variant(base, LEARNFeatures, "LEARN", doc)
