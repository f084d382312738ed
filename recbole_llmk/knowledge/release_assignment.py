"""A run's users and items assigned to released cluster knowledge (the REKI release): which
release, its store settings, its answers as a replay file, and which cluster each of the run's
items (by ML-1M id, or title and year) and users (by id, or their *training* likes and dislikes)
joins. Used by REKI (``reki_knowledge: released``) and ReLand (``reland_pool_source: released``);
reading the release's own files is :mod:`recbole_llmk.knowledge.reki_release`."""

import os

from recbole_llmk.defaults import setting
from recbole_llmk.knowledge.pipeline import cache_dir, digest
from recbole_llmk.knowledge.reki_release import (ReleasedKnowledge, assign_users_by_overlap, match_items_by_title,
                                                 read_recbole_titles)


def load_release(config):
    if not config["reki_release_path"]:
        raise ValueError("reki_knowledge=released needs reki_release_path: the release's group_data folder "
                         "(e.g. ../shared/data/reki/ml-1m/proc_data/group_data)")
    return ReleasedKnowledge.load(config["reki_release_path"], config["reki_release_movies"])


def release_settings(config, release):
    """Store settings of knowledge assigned from ``release`` (REKI's, and ReLand's released pool)."""
    return {"llm_backend": "replay", "llm_model": release.model,
            "release": digest([release.fingerprint(), config["reki_release_match"], config["reki_like_threshold"]])}


def release_replay_file(config, release):
    """Write the release's answers as a replay file in the run's answer cache; -> its path."""
    path = os.path.join(cache_dir(config), f"release-{release.fingerprint()}.jsonl")
    release.write_replay_file(path)
    return path


def items_to_release(config, items, describer, release):
    """{item token: ML-1M movie id} by id (``reki_release_match: id``) or by title and year."""
    if (setting(config, "reki_release_match")) == "id":
        return {t: t for t in items}
    title, year = setting(config, "reki_release_title_fields")
    return match_items_by_title(release.movies_dat, read_recbole_titles(describer._atomic_path("item"), title, year))


def released_user_clusters(config, users, frame, describer, release, to_ml1m):
    """{user token: (liked cluster, disliked cluster)}: by ML-1M user id (``reki_release_match:
    id``), or by the overlap of the user's *training* likes and dislikes with each cluster's
    representative items."""
    if (setting(config, "reki_release_match")) == "id":
        return {u: release.user_clusters.get(u, (None, None)) for u in users}
    return assign_users_by_overlap(release, liked_and_disliked(frame, describer, to_ml1m, config))


def liked_and_disliked(frame, describer, to_ml1m, config, every_like=False):
    """{user: (liked ids, disliked ids)} from training interactions and their ratings, items
    renamed by ``to_ml1m`` (e.g. to ML-1M ids). Without ratings: an error, or with ``every_like``
    every interaction is a like."""
    frame = describer.with_ratings(frame)
    if "rating" not in frame:
        if every_like:
            return {u: ([to_ml1m[i] for i in rows["item"] if i in to_ml1m], []) for u, rows in frame.groupby("user")}
        raise ValueError("reki_release_match=title assigns users by liked/disliked items, which needs ratings")
    threshold = setting(config, "reki_like_threshold")
    frame = frame[frame["item"].isin(to_ml1m.keys())]
    histories = {}
    for user, rows in frame.groupby("user"):
        liked = rows["rating"] >= threshold
        histories[user] = ([to_ml1m[i] for i in rows["item"][liked]], [to_ml1m[i] for i in rows["item"][~liked]])
    return histories
