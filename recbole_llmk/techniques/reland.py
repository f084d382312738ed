"""ReLand knowledge: LLM rationales for a few seed users, shared with everyone by retrieval.

Reference: ReLand, Tian et al., "Integrating Large Language Models' Insights into Industrial
Recommenders via a Controllable Reasoning Pool", RecSys 2024 (implemented by its authors on
RecBole, not released). Sample representative and active *seed users*, ask the LLM
for a step-by-step, recommendation-oriented rationale for each (the *reasoning pool*), and give
every other user the rationale of its most similar seed by behaviour.

Stages, each from the run's *training* split only:

1. behaviour encoder (``train_behaviour_encoder``): a light RecBole model (LightGCN by default)
   trained by RecBole's trainer on the same training split as the run (checked by fingerprint);
   its user vectors M are saved next to the stores and reused.
2. seed sampling (:class:`SeedSampler`): k-means clusters of M, then representativeness-aware and
   importance-aware picks in turn until the pool reaches its size.
3. rationales (``reland_cot`` prompt, Steps 0-2) through the shared generation pipeline; each
   answer is parsed (:func:`parse_rationale`); Step 2 is the knowledge, Step 1 the explanation.
4. retrieval (:func:`nearest_seeds`): every training user gets its nearest seed's rationale
   (cosine of behaviour vectors); users without training interactions get the default vector.

``reland_pool_source: released`` replaces stages 2-3 by released cluster knowledge (the REKI
authors' gpt-3.5 answers for liked-items user clusters of MovieLens-1M): each cluster is a seed
(:func:`released_pool`). Those answers were written by their authors from their own split of
ML-1M, so, unlike everything built here, their text is not guaranteed to come from this run's
training split; the retrieval that assigns them uses the training split only.

The store holds ``user`` (retrieved rationale) and ``item`` (item description, the "+f_item"
side) vectors, plus ``reasoning_pool.jsonl`` (seed, behaviour vector, rationale, parse status)
and ``explanations.tsv`` (each user's seed, similarity and Step 1 summary) for people to read.
Without the user side (``reland_user_rationale: False``, "+f_item") only the item vectors are
built: stages 1-4 are skipped.
"""

import json
import logging
import math
import re
from dataclasses import dataclass

import numpy as np

from recbole_llmk.defaults import setting
from recbole_llmk.knowledge.descriptions import Describer
from recbole_llmk.knowledge.history import split_fingerprint, training_interactions
from recbole_llmk.knowledge.pipeline import KnowledgePlan, digest, store_settings
from recbole_llmk.knowledge.prompts import PromptTemplate

TECHNIQUE = "ReLand"
STRATEGIES = ("adaptive", "uniform")


# --- seed sampling --------------------------------------------------------------------------------
def proportional_allocation(total, sizes):
    """``total`` picks over groups in proportion to ``sizes`` (largest remainder), each group
    first getting one pick when ``total`` allows it; never more than a group's size."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(min(total, sizes.sum()))
    alloc = np.zeros(len(sizes), dtype=np.int64)
    if total >= len(sizes):
        alloc[:] = np.minimum(1, sizes)
    while alloc.sum() < total:
        room = sizes - alloc
        left = total - alloc.sum()
        share = left * room / room.sum()
        step = np.minimum(np.floor(share).astype(np.int64), room)
        if step.sum() == 0:  # hand out the remainder by largest fractional share
            order = np.argsort(-(share - np.floor(share)), kind="stable")
            step[order[:left]] = 1
            step = np.minimum(step, room)
        alloc += step
    return alloc


class WeightedDraws:
    """Ids drawn with probability proportional to their weights, without replacement, from a pool
    that shrinks as ids are taken (here or by ``remove``).

    Each ``draw(rng, m)`` takes numpy's own steps for ``rng.choice(n, m, replace=False, p=w/w.sum())``
    (a batch of uniforms read against the cumulative weights, repeats dropped in order of first
    appearance, the shortfall drawn again), so it consumes the generator alike and picks the same ids
    (up to rounding of the cumulative sums). The cumulative weights live in a Fenwick tree: a pick
    or a removal costs O(log n) instead of numpy's O(n) cumulative sum per call, which made seed
    sampling quadratic in users (one call per round, ~n/20 rounds)."""

    def __init__(self, weights):
        self.weights = np.asarray(weights, dtype=np.float64).tolist()
        self.n = len(self.weights)
        self.top = 1 << max(self.n.bit_length() - 1, 0)
        self.build()

    def build(self):
        """The tree from the weights left; again whenever the pool's weight has fallen a thousandfold
        (a few times at most), so the sums' rounding stays far below the lightest weight left."""
        sums = np.concatenate([[0.0], np.cumsum(self.weights)])
        index = np.arange(1, self.n + 1)
        self.tree = [0.0] + (sums[index] - sums[index - (index & -index)]).tolist()  # node i: its lowbit's span
        self.total = self.built_total = float(sums[-1])

    def remove(self, i):
        weight, self.weights[i] = self.weights[i], 0.0
        if weight:
            self.total -= weight
            node = i + 1
            while node <= self.n:
                self.tree[node] -= weight
                node += node & -node
            if self.total < 1e-3 * self.built_total:
                self.build()

    def find(self, target):
        """The first id whose cumulative weight exceeds ``target`` (numpy's searchsorted 'right')."""
        position, step = 0, self.top
        while step:
            node = position + step
            if node <= self.n and self.tree[node] <= target:
                position, target = node, target - self.tree[node]
            step >>= 1
        if position >= self.n or not self.weights[position]:  # rounding at the end of the pool
            position = max(i for i in range(min(position, self.n - 1), -1, -1) if self.weights[i])
        return position

    def draw(self, rng, m):
        found = []
        while len(found) < m:
            picks = [self.find(u * self.total) for u in rng.random(m - len(found))]
            for pick in dict.fromkeys(picks):
                found.append(pick)
                self.remove(pick)
        return found


@dataclass
class SeedSampler:
    """ReLand's adaptive seed sampling over behaviour vectors.

    ``n_seeds`` users are picked. ``adaptive``: k-means (faiss) into ``n_clusters`` groups, then
    alternately (a) representativeness-aware picks, whose running total over clusters is
    proportional to their sizes (each cluster first gets its user closest to the centre, then the
    next-closest ones), and (b) importance-aware picks, users drawn without replacement with
    probability proportional to their interaction counts; ``round_size`` picks per step
    (default: the number of clusters). ``uniform``: a uniform random sample (the ablation).
    Deterministic for ``seed``."""

    n_seeds: int
    n_clusters: int = 10
    strategy: str = "adaptive"
    round_size: int = None
    seed: int = 0

    def sample(self, vectors, counts):
        """Indices of the seed users, in the order they were picked; also ``self.labels_`` and
        ``self.centroids_`` (the k-means clusters) and ``self.how_`` (``representative`` or
        ``important``, per seed)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        counts = np.asarray(counts, dtype=np.float64)
        n = len(vectors)
        if self.strategy not in STRATEGIES:
            raise ValueError(f"reland_sampling must be one of {STRATEGIES}, got '{self.strategy}'")
        if not 1 <= self.n_seeds <= n:
            raise ValueError(f"the reasoning pool needs between 1 and {n} seed users, got {self.n_seeds}")
        rng = np.random.default_rng(self.seed)
        if self.strategy == "uniform":
            self.labels_ = np.zeros(n, dtype=np.int64)
            self.how_ = ["uniform"] * self.n_seeds
            return rng.choice(n, self.n_seeds, replace=False)
        from recbole_llmk.knowledge.kmeans import faiss_kmeans

        labels, centroids = faiss_kmeans(vectors, self.n_clusters, seed=self.seed)
        self.labels_, self.centroids_ = labels, centroids
        clusters = [np.flatnonzero(labels == k) for k in range(len(centroids))]
        by_closeness = [c[np.argsort(((vectors[c] - centroids[k]) ** 2).sum(1), kind="stable")]
                        for k, c in enumerate(clusters)]
        sizes = [len(c) for c in clusters]
        step = int(self.round_size or len(clusters))
        chosen, how = [], []
        taken = np.zeros(n, dtype=bool)
        by_activity = WeightedDraws(np.maximum(counts, 1e-12))
        rep_done = np.zeros(len(clusters), dtype=np.int64)  # representative picks per cluster
        cursor = np.zeros(len(clusters), dtype=np.int64)
        rep_total = 0
        while len(chosen) < self.n_seeds:
            rep_total += min(step, self.n_seeds - len(chosen))
            for k, want in enumerate(proportional_allocation(rep_total, sizes)):
                while rep_done[k] < want and cursor[k] < sizes[k] and len(chosen) < self.n_seeds:
                    user = by_closeness[k][cursor[k]]
                    cursor[k] += 1
                    if not taken[user]:
                        taken[user] = True
                        by_activity.remove(user)
                        chosen.append(user)
                        how.append("representative")
                        rep_done[k] += 1
            draw = min(step, self.n_seeds - len(chosen), n - len(chosen))
            for user in by_activity.draw(rng, draw):
                taken[user] = True
                chosen.append(user)
                how.append("important")
        self.how_ = how
        return np.asarray(chosen, dtype=np.int64)


def pool_size(config, n_users):
    """Seeds in the reasoning pool: ``reland_seed_count`` if set, else ``reland_seed_ratio`` of the users."""
    if config["reland_seed_count"]:
        return int(min(config["reland_seed_count"], n_users))
    ratio = float(config["reland_seed_ratio"] if config["reland_seed_ratio"] is not None else 0.1)
    if not 0 < ratio <= 1:
        raise ValueError(f"reland_seed_ratio must be in (0, 1], got {ratio}")
    return max(1, math.ceil(ratio * n_users))


# --- retrieval ------------------------------------------------------------------------------------
RETRIEVALS = ("exact", "ivf")


def nearest_seeds(vectors, seed_vectors, retrieval="exact", nprobe=32):
    """For every row of ``vectors``: (row of ``seed_vectors`` with the highest cosine similarity,
    that similarity), by faiss inner product over L2-normalised vectors.

    ``retrieval``: ``exact`` (a flat index: every seed compared, cost users x seeds) or ``ivf``
    (an inverted-file index over ``4 sqrt(seeds)`` k-means cells of the seeds, ``nprobe`` of them
    searched per user: approximate, for pools too large to compare with every user;
    ``benchmarks/scale.py`` measures its recall against exact)."""
    import faiss

    if retrieval not in RETRIEVALS:
        raise ValueError(f"reland_retrieval must be one of {RETRIEVALS}, got '{retrieval}'")

    def unit(x):
        x = np.ascontiguousarray(x, dtype=np.float32).copy()
        faiss.normalize_L2(x)
        return x

    seeds = unit(seed_vectors)
    dim = seeds.shape[1]
    if retrieval == "exact":
        index = faiss.IndexFlatIP(dim)
    else:
        cells = max(1, min(int(4 * math.sqrt(len(seeds))), len(seeds)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, cells, faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 1  # small pools: train on what there is, quietly
        index.train(seeds)
        index.nprobe = min(int(nprobe), cells)
    index.add(seeds)
    queries = unit(vectors)
    similarity, position = index.search(queries, 1)
    missed = position.ravel() < 0  # ivf: every cell searched for this user was empty
    if missed.any():
        exact = faiss.IndexFlatIP(dim)
        exact.add(seeds)
        similarity[missed], position[missed] = exact.search(queries[missed], 1)
    return position.ravel(), similarity.ravel()


# --- rationales -----------------------------------------------------------------------------------
STEP = re.compile(r"^[\s*#>_-]*step\s*([0-2])\b[\s*:.)_-]*", re.IGNORECASE | re.MULTILINE)


@dataclass
class Rationale:
    summary: str          # Step 1: one-sentence preference summary
    recommendation: str   # Step 2: recommended categories and items
    ok: bool              # both steps found and non-empty


def parse_rationale(text):
    """Split a CoT answer into its steps. Tolerates markdown (``**Step 1:**``, ``### Step 2``),
    any case, and text before Step 0/1. A step's text runs to the next step marker."""
    marks = list(STEP.finditer(text or ""))
    steps = {}
    for mark, following in zip(marks, marks[1:] + [None]):
        end = following.start() if following else len(text)
        steps.setdefault(int(mark.group(1)), text[mark.end():end].strip())
    summary, recommendation = steps.get(1, ""), steps.get(2, "")
    return Rationale(summary, recommendation, bool(summary and recommendation))


class ReLandPrompts:
    """The recommendation-oriented CoT prompt of a seed user (profile + training history)."""

    def __init__(self, config, describer=None):
        self.describer = describer or Describer(config)
        self.hook = self.describer.hook
        self.template = PromptTemplate.load(setting(config, "reland_prompt"))
        self.history_length = setting(config, "history_length")
        self.step0 = bool(config["reland_step0"])

    @property
    def digest(self):
        return digest([self.template.text, self.history_length, self.step0, vars(self.hook)])

    def requests(self, frame, users):
        from recbole_llmk.knowledge.generation import Request

        noun, item = self.hook.user_noun, self.hook.item_noun
        step0 = (f"Step 0: Condense the history into the main kinds of {item}s this {noun} engages with.\n"
                 if self.step0 else "")
        requests = []
        for token, (profile, history) in self.describer.user_contexts(frame, users, self.history_length).items():
            prompt = self.template.render(profile=profile, history=history, user_noun=noun, item_noun=item, step0=step0)
            requests.append(Request(f"seed:{token}", prompt, self.describer.user_text(profile, history)))
        return requests


# --- behaviour encoder ----------------------------------------------------------------------------
def train_behaviour_encoder(config, frame):
    """``(user tokens, vectors)`` of the behaviour encoder (``reland_behaviour_model``) trained on
    ``frame``'s split; see :func:`recbole_llmk.knowledge.pretrained.pretrained_vectors`."""
    from recbole_llmk.knowledge.pretrained import pretrained_vectors

    vectors = pretrained_vectors(config, frame, setting(config, "reland_behaviour_model"),
                                 setting(config, "reland_behaviour_epochs"), config["reland_behaviour_config"])
    return vectors["user"]


# --- what the fusion reads -----------------------------------------------------------------------
def check_knowledge_norm(norm):
    """``norm`` when it is a valid ``reland_knowledge_norm`` (a positive number, or None); else a
    ValueError that says what to set (the config checks it before any knowledge is built)."""
    if norm is not None and (isinstance(norm, bool) or not isinstance(norm, (int, float)) or not norm > 0):
        raise ValueError(f"reland_knowledge_norm: {norm!r} is not a positive number (the mean row norm to scale "
                         f"the knowledge to, e.g. 0.1) or ~ for the encoder's vectors as they are")
    return norm


def rescaled(table, norm):
    """``table`` ([n_ids, k], row 0 padding) centred over its ids and scaled so that its rows' mean
    norm is ``norm`` (``reland_knowledge_norm``; None: the table as it is).

    Why: a text encoder's vectors share a large common component and are far longer than an
    initialised ID row. Once a fusion's projection opens, the common part shifts every id alike
    (which a graph model propagates as a bias by degree) and the text outweighs the ID row.
    Centring loses nothing a projection with a bias could use; the scale sets how loud the text
    starts against the ID rows."""
    if check_knowledge_norm(norm) is None:
        return table
    out = table.copy()
    rows = np.asarray(table[1:], dtype=np.float64)  # near-equal rows keep their differences
    centred = rows - rows.mean(0)
    mean_norm = float(np.linalg.norm(centred, axis=1).mean()) if len(centred) else 0.0
    out[1:] = centred * (float(norm) / mean_norm) if mean_norm > 0 else centred  # a constant table: zeros
    return out


# --- the plan -------------------------------------------------------------------------------------
def sampler_from(config, n_users):
    return SeedSampler(pool_size(config, n_users), n_clusters=setting(config, "reland_n_clusters"),
                       strategy=setting(config, "reland_sampling"), round_size=config["reland_round_size"],
                       seed=config["reland_seed"] if config["reland_seed"] is not None else config["seed"])


POOL_SOURCES = ("sampled", "released")
SIDE_KEYS = {"user": "reland_user_rationale", "item": "reland_item_text"}


def uses_side(config, side):
    """Whether the run fuses ReLand knowledge into its ``user`` or ``item`` side (default: both)."""
    return config[SIDE_KEYS[side]] is None or bool(config[SIDE_KEYS[side]])


def reland_requests(config, dataset):
    """Store settings and knowledge plan of ReLand for the training dataset ``dataset``."""
    frame = training_interactions(dataset)
    prompts = ReLandPrompts(config)
    source = setting(config, "reland_pool_source")
    if source not in POOL_SOURCES:
        raise ValueError(f"reland_pool_source must be one of {POOL_SOURCES}, got '{source}'")
    settings = store_settings(config, TECHNIQUE, split_fingerprint(frame), prompts.digest)
    if not uses_side(config, "user"):
        # "+f_item": item descriptions only. No behaviour encoder, seeds or rationales, so the store
        # depends on neither the pool settings nor the run's seed and one serves every seed.
        settings.update(llm_backend="none", llm_model=None, fused_sides=["item"])
        return settings, lambda: KnowledgePlan([], *item_layout(dataset, prompts))
    settings["pool"] = digest({k: config[k] for k in (
        "reland_seed_ratio", "reland_seed_count", "reland_n_clusters", "reland_sampling", "reland_round_size",
        "reland_seed", "reland_behaviour_model", "reland_behaviour_epochs", "reland_behaviour_config",
        "reland_pool_source")} | {"seed": config["seed"]})
    if setting(config, "reland_retrieval") != "exact":  # only then: the stores built before keep their names
        settings["retrieval"] = [config["reland_retrieval"], setting(config, "reland_ivf_nprobe")]
    if source == "released":
        from recbole_llmk.knowledge.release_assignment import load_release, release_settings

        settings.update(pool_source=source, **release_settings(config, load_release(config)))
    return settings, lambda: reland_plan(config, dataset, frame, prompts, source)


def sampled_pool(config, frame, prompts, users, M, counts):
    """Seeds sampled from this run's users (:class:`SeedSampler`), one CoT prompt each."""
    sampler = sampler_from(config, len(users))
    rows = sampler.sample(M, counts)
    seeds = [users[r] for r in rows]
    logging.getLogger().info(
        f"ReLand reasoning pool: {len(seeds)} seed users of {len(users)} ({100 * len(seeds) / len(users):.1f} %), "
        f"{sampler.strategy} sampling; {sum(h == 'representative' for h in sampler.how_)} representative, "
        f"{sum(h == 'important' for h in sampler.how_)} by activity")
    return {"seeds": seeds, "how": sampler.how_, "vectors": M[rows], "requests": prompts.requests(frame, seeds),
            "parse": (setting(config, "llm_backend")) != "none", "backend": None}


def released_pool(config, dataset, frame, prompts, users, M):
    """Seeds from released cluster knowledge (the REKI release's liked-items user clusters): each
    cluster with a member among this run's training users is one seed, its behaviour vector the
    mean of its members' vectors, its rationale the released completion (replayed, never
    regenerated; kept whole: it is a preference analysis, not a Step 1/Step 2 answer). Members by
    ML-1M user id or by training-history overlap (``reki_release_match``, see ``techniques.reki``)."""
    from recbole_llmk.knowledge.generation import Request
    from recbole_llmk.knowledge.release_assignment import (items_to_release, load_release, release_replay_file,
                                                            released_user_clusters)

    release = load_release(config)
    items = list(dataset.field2id_token[dataset.iid_field][1:])
    to_release = items_to_release(config, items, prompts.describer, release)
    clusters = released_user_clusters(config, users, frame, prompts.describer, release, to_release)
    members = {}
    for row, user in enumerate(users):
        liked = (clusters.get(user) or (None, None))[0]
        if liked is not None:
            members.setdefault(liked, []).append(row)
    if not members:
        raise ValueError(f"no training user of {config['dataset']} joins a released user cluster")
    ids = sorted(members)
    replay = release_replay_file(config, release)
    seeds = [f"positive-cluster-{c}" for c in ids]
    logging.getLogger().info(
        f"ReLand reasoning pool from {release.model} released clusters: {len(ids)} liked-items clusters with "
        f"{sum(map(len, members.values()))} of {len(users)} training users as members")
    return {"seeds": seeds, "how": ["released cluster"] * len(ids),
            "vectors": np.stack([M[members[c]].mean(0) for c in ids]),
            "requests": [Request(f"seed:{s}", release.prompts[("positive", c)], "") for s, c in zip(seeds, ids)],
            "parse": False,
            "backend": {"llm_backend": "replay", "llm_replay_file": replay, "llm_model": release.model}}


def reland_plan(config, dataset, frame, prompts, source="sampled"):
    tokens, vectors = train_behaviour_encoder(config, frame)
    active = frame["user"].value_counts()
    row_of = {t: r for r, t in enumerate(tokens)}
    users = sorted((u for u in active.index if u in row_of), key=row_of.get)  # training users only
    M = vectors[[row_of[u] for u in users]]
    if source == "released":
        pool = released_pool(config, dataset, frame, prompts, users, M)
    else:
        pool = sampled_pool(config, frame, prompts, users, M, active[users].to_numpy())
    position, similarity = nearest_seeds(M, pool["vectors"], setting(config, "reland_retrieval"),
                                         setting(config, "reland_ivf_nprobe"))
    layout, texts = item_layout(dataset, prompts)
    layout["user"] = {u: f"seed:{pool['seeds'][p]}" for u, p in zip(users, position)}
    pool.update(users=users, position=position, similarity=similarity)
    return KnowledgePlan(pool["requests"], layout, texts, backend=pool["backend"],
                         postprocess=lambda answers: pool_files(answers, pool))


def item_layout(dataset, prompts):
    """The "+f_item" side: every item's description, keyed ``item:<token>``."""
    items = prompts.describer.describe("item")
    item_tokens = list(dataset.field2id_token[dataset.iid_field][1:])
    texts = {f"item:{i}": items.get(i) or f"{prompts.hook.item_noun} {i}" for i in item_tokens}
    return {"item": {i: f"item:{i}" for i in item_tokens}}, texts


def pool_files(answers, pool):
    """Parse the seed rationales; keep Step 2 as the knowledge; write the pool and explanations.

    Unparsed (kept whole): with the ``none`` backend, the seed's own history description; with a
    released pool, the released completion."""
    logger = logging.getLogger()
    parsed, malformed = {}, []
    for seed in pool["seeds"]:
        answer = answers[f"seed:{seed}"]
        parsed[seed] = parse_rationale(answer) if pool["parse"] else Rationale(answer, answer, True)
        if not parsed[seed].ok:
            malformed.append(seed)
    if malformed:
        logger.warning(f"{len(malformed)} of {len(parsed)} rationales lack a Step 1 or Step 2 (e.g. seed "
                       f"{malformed[0]}); their whole answer is used as the knowledge. See reasoning_pool.jsonl")
    knowledge = {f"seed:{s}": (r.recommendation if r.ok else answers[f"seed:{s}"].strip()) for s, r in parsed.items()}
    pool_lines = [json.dumps({"seed": s, "picked_as": how, "behaviour_vector": [round(float(x), 6) for x in vec],
                              "rationale": answers[f"seed:{s}"], "step1": parsed[s].summary,
                              "step2": parsed[s].recommendation, "parsed": parsed[s].ok}, ensure_ascii=False)
                  for s, how, vec in zip(pool["seeds"], pool["how"], pool["vectors"])]
    explanation = ["user\tseed_user\tsimilarity\tsummary"]
    for user, p, sim in zip(pool["users"], pool["position"], pool["similarity"]):
        seed = pool["seeds"][p]
        summary = " ".join((parsed[seed].summary or knowledge[f"seed:{seed}"]).split())[:300]
        explanation.append(f"{user}\t{seed}\t{sim:.4f}\t{summary}")
    files = {"reasoning_pool.jsonl": "\n".join(pool_lines) + "\n", "explanations.tsv": "\n".join(explanation) + "\n"}
    return {**answers, **knowledge}, files