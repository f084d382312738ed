"""The REKI authors' released ML-1M collective knowledge: parsing, id mapping, replay, transfer.

Tests that need ../shared/data (relative to the project root) skip when it is absent; the
hand-made examples always run."""

import collections
import gzip
import json
import os
import random
import shutil
from pathlib import Path

import pytest

from recbole_llmk.knowledge.reki_release import (ReleaseError, ReleasedKnowledge, assign_users_by_overlap,
                                                  item_clusters_for, kar_item_order, kar_title, kar_user_order,
                                                  match_items_by_title, prompt_titles, read_recbole_titles)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RELEASE = DATA / "reki" / "ml-1m" / "proc_data" / "group_data"
MOVIES = DATA / "ml-1m" / "movies.dat"
RATINGS = DATA / "ml-1m" / "partial" / "ratings_users0001-2999.dat.gz"


def ml100k_item_file():
    import recbole

    return Path(recbole.__file__).parent / "dataset_example" / "ml-100k" / "ml-100k.item"


@pytest.fixture(scope="module")
def release():
    if not RELEASE.is_dir() or not MOVIES.is_file():
        pytest.skip(f"shared data not found under {DATA}")
    return ReleasedKnowledge.load(RELEASE, movies_dat=MOVIES)


def lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_377_completions_107_item_135_positive_135_negative(release):
    from_files = {kind: len(lines(RELEASE / sub / "knowledge.json"))
                  for kind, sub in (("item", "item"), ("positive", "user/positive"), ("negative", "user/negative"))}
    assert from_files == {"item": 107, "positive": 135, "negative": 135}
    assert release.counts() == from_files
    assert len(release.texts) == len(release.prompts) == 377
    assert release.model == "gpt-3.5-turbo-0613"
    assert all(text.strip() for text in release.texts.values())


def test_every_item_and_user_cluster_has_completion_text(release):
    assert len(release.item_cluster_internal) == 3706
    assert all(("item", c) in release.texts for c in release.item_cluster_internal.values())
    assert len(release.item_cluster) == 1193  # the movies the item prompts name
    assert all(("item", c) in release.texts for c in release.item_cluster.values())
    assert len(release.user_clusters) == 6040 and set(release.user_clusters) == {str(u) for u in range(1, 6041)}
    for positive, negative in release.user_clusters.values():
        assert ("positive", positive) in release.texts and ("negative", negative) in release.texts


def test_user_pairs_are_stored_negative_first(release):
    """id2pos_neg_group.json holds [negative, positive] (the authors' README); the per-side files agree."""
    positive = json.loads((RELEASE / "user/positive/result/id2group.json").read_text())
    negative = json.loads((RELEASE / "user/negative/result/id2group.json").read_text())
    for user, (pos, neg) in release.user_clusters_internal.items():
        assert (pos, neg) == (positive[str(user)], negative[str(user)])


def test_prompt_titles_resolve_to_movielens_ids(release):
    assert release.unresolved_titles == []
    sizes = collections.Counter(len(items) for items in release.representatives.values())
    assert sizes[15] == 233 and sizes[0] == 15  # 15 user clusters have no items in the release
    titles = prompt_titles(release.prompts[("item", 1)])
    assert titles[:3] == ["Prisoner of the Mountains (Kavkazsky Plennik) (1996)", "Tora! Tora! Tora! (1970)",
                          "The Thin Blue Line (1988)"]
    assert release.item_cluster["1189"] == 1  # movies.dat: 1189::Thin Blue Line, The (1988)


def test_all_377_prompts_replay_through_the_replay_backend(release, tmp_path):
    from recbole_llmk.knowledge.generation import Request, make_backend
    from recbole_llmk.knowledge.llm_replay import load_recordings

    replay_file = tmp_path / "reki_ml1m.jsonl"
    assert release.write_replay_file(replay_file) == 377
    with open(replay_file, encoding="utf-8") as reader:  # a run replaying while another one starts
        assert release.write_replay_file(replay_file) == 377
        assert os.fstat(reader.fileno()).st_ino != os.stat(replay_file).st_ino  # swapped in, not rewritten
        assert len(reader.readlines()) == 377
    assert [p.name for p in tmp_path.iterdir()] == ["reki_ml1m.jsonl"]
    assert len(load_recordings(str(replay_file))) == 363  # 15 empty clusters share one prompt text
    backend = make_backend({"llm_backend": "replay", "llm_replay_file": str(replay_file)}, str(tmp_path / "cache"))
    requests = [Request(key=f"{kind}:{cluster}", prompt=prompt, description="")
                for (kind, cluster), prompt in release.prompts.items()]
    answers, report = backend.generate(requests)
    assert report.requested == 377 and report.failed == 0 and report.called == 0
    duplicated = {p for p, n in collections.Counter(release.prompts.values()).items() if n > 1}
    assert all(not prompt_titles(p) for p in duplicated)
    for (kind, cluster), prompt in release.prompts.items():
        if prompt not in duplicated:
            assert answers[f"{kind}:{cluster}"] == release.texts[(kind, cluster)]


def test_ml100k_titles_match_movielens_1m():
    if not MOVIES.is_file():
        pytest.skip(f"{MOVIES} not found")
    titles = read_recbole_titles(ml100k_item_file())
    assert len(titles) == 1682
    matched = match_items_by_title(MOVIES, titles)
    assert len(matched) == 1661 and len(set(matched.values())) == 1643
    # whole title + year only: the README's 1,625, plus one accented title and one year read from the title
    assert len(match_items_by_title(MOVIES, titles, year_tolerance=0, alternates=False)) == 1627
    assert matched["1"] == "1"  # Toy Story
    assert matched["11"] == "47"  # "Seven (Se7en)" is ML-1M's "Seven (Se7en) (1995)"
    assert matched["510"] == "2019"  # ml-100k's "Magnificent Seven, The" (1954) is Seven Samurai
    assert "50" not in matched  # "Star Wars" vs "Star Wars: Episode IV - A New Hope": not guessed


def test_item_clusters_for_ml100k(release):
    matched = match_items_by_title(release.movies_dat, read_recbole_titles(ml100k_item_file()))
    clusters = item_clusters_for({**matched, "267": None}, release)
    assert clusters["267"] is None
    covered = {token for token, cluster in clusters.items() if cluster is not None}
    assert len(covered) == 496
    assert all(clusters[t] == release.item_cluster[matched[t]] for t in covered)


def test_users_are_renumbered_the_kar_way(release):
    """Users the release puts in one positive cluster share more liked items under KAR's shuffle
    than random pairs do; under the identity they would not (ratings of users 1-2999 only)."""
    if not RATINGS.is_file():
        pytest.skip(f"{RATINGS} not found")
    assert kar_user_order(6040)[:3] == ["2179", "3813", "2108"]
    liked = collections.defaultdict(set)
    with gzip.open(RATINGS, "rt") as f:
        for line in f:
            user, movie, rating, _ = line.split("::")
            if int(rating) >= 4:
                liked[user].add(movie)
    members = collections.defaultdict(list)
    for user, (positive, _) in release.user_clusters.items():
        if user in liked:
            members[positive].append(user)
    rng = random.Random(0)

    def jaccard(a, b):
        return len(liked[a] & liked[b]) / len(liked[a] | liked[b])

    within = [jaccard(*rng.sample(m, 2)) for m in members.values() if len(m) > 1 for _ in range(10)]
    users = sorted(liked)
    between = [jaccard(*rng.sample(users, 2)) for _ in range(len(within))]
    assert sum(within) / len(within) > 1.3 * sum(between) / len(between)


def test_items_are_renumbered_the_kar_way(release):
    """The first shuffled user (ML-1M 2179) is complete in the partial ratings: its 146 movies are
    internal items 1..146, and all 42 of them that item prompts name agree with id2group.json."""
    if not RATINGS.is_file():
        pytest.skip(f"{RATINGS} not found")
    placed = kar_item_order(RATINGS, kar_user_order(6040))
    assert len(placed) == 146
    named = {i: m for i, m in placed.items() if m in release.item_cluster}
    assert len(named) == 42
    assert all(release.item_cluster_internal[i] == release.item_cluster[m] for i, m in named.items())
    extended = ReleasedKnowledge.load(RELEASE, movies_dat=MOVIES, ratings_dat=RATINGS)
    assert len(extended.item_cluster) == 1193 + 146 - 42


def test_an_incomplete_release_names_the_missing_file(tmp_path):
    if not RELEASE.is_dir():
        pytest.skip(f"{RELEASE} not found")
    copy = tmp_path / "group_data"
    shutil.copytree(RELEASE, copy, ignore=shutil.ignore_patterns("tree.tsv"))
    (copy / "user" / "negative" / "knowledge.json").unlink()
    with pytest.raises(ReleaseError, match=r"negative.knowledge\.json"):
        ReleasedKnowledge.load(copy)
    with pytest.raises(ReleaseError, match="not a folder"):
        ReleasedKnowledge.load(tmp_path / "nowhere")


def test_a_moved_release_keys_the_same_knowledge_and_a_changed_answer_does_not(release, tmp_path):
    """Stores and replay files are keyed by what the release says, so a release copied to another
    folder (another machine) reuses the knowledge built from it, and an edited one does not."""
    import dataclasses

    from recbole_llmk.knowledge.release_assignment import release_settings

    copy = tmp_path / "elsewhere" / "group_data"
    shutil.copytree(RELEASE, copy)
    moved = ReleasedKnowledge.load(copy, movies_dat=MOVIES)
    config = {"reki_release_match": "title", "reki_like_threshold": 4}
    assert release_settings(config, moved) == release_settings(config, release)
    key = sorted(release.texts)[0]
    edited = dataclasses.replace(moved, texts={**moved.texts, key: moved.texts[key] + " (edited)"})
    assert release_settings(config, edited) != release_settings(config, release)
    user, (liked, disliked) = sorted(release.user_clusters.items())[0]
    regrouped = dataclasses.replace(moved, user_clusters={**moved.user_clusters, user: (disliked, liked)})
    assert regrouped.fingerprint() != release.fingerprint()
    assert release_settings(dict(config, reki_like_threshold=3), moved) != release_settings(config, release)


def test_kar_titles_and_prompt_parsing():
    assert kar_title("Thin Blue Line, The (1988)") == "The Thin Blue Line (1988)"
    assert kar_title("Affair to Remember, An (1957)") == "Affair to Remember, An (1957)"  # KAR moves The/A only
    assert kar_title("Red Violin, The (Le Violon rouge) (1998)") == "Red Violin, The (Le Violon rouge) (1998)"
    prompt = ("Given a set of movies consisting of Good, the Bad and the Ugly, The (1966), Heat (1995),  please "
              "describe the common characteristics of these movies.")
    assert prompt_titles(prompt) == ["Good, the Bad and the Ugly, The (1966)", "Heat (1995)"]
    assert prompt_titles("Given a set of movies consisting of  please describe the common characteristics") == []
    with pytest.raises(ReleaseError):
        prompt_titles("Describe these movies")


def hand_made_release():
    return ReleasedKnowledge(
        root="hand-made", model="test", texts={}, prompts={}, item_cluster_internal={}, user_clusters_internal={},
        member_items_internal={}, user_clusters={}, movies_dat="movies.dat",
        item_cluster={"1": 3, "2": 3, "10": 5},
        representatives={("positive", 1): ["1", "2", "3"], ("positive", 2): ["3", "4"],
                         ("positive", 3): ["1", "2", "3", "4", "5", "6"],
                         ("negative", 1): ["7", "8"], ("negative", 2): ["8", "9"]})


def test_assign_users_by_overlap_on_a_hand_made_example():
    assigned = assign_users_by_overlap(hand_made_release(), {
        "u1": (["1", "2"], ["7"]),        # Jaccard 2/3 with positive 1, 2/6 with 3; negative 1 only
        "u2": (["4"], ["8"]),             # 1/2 with positive 2 beats 1/6 with 3; negatives tie -> smaller id
        "u3": (["99"], []),               # nothing shared
        "u4": ([1, 2, 3, 4], ["9", "9"]),  # ints work too; Jaccard 3/4 (positive 1) beats 4/6 (positive 3)
    })
    assert assigned["u1"] == (1, 1)
    assert assigned["u2"] == (2, 1)
    assert assigned["u3"] == (None, None)
    assert assigned["u4"] == (1, 2)


def test_item_clusters_for_passes_through_unmatched_items():
    clusters = item_clusters_for({"a": "1", "b": "10", "c": "77", "d": None}, hand_made_release())
    assert clusters == {"a": 3, "b": 5, "c": None, "d": None}


def test_release_without_titles_refuses_title_based_transfer():
    release = hand_made_release()
    release.movies_dat = None
    with pytest.raises(ReleaseError, match="movies.dat"):
        item_clusters_for({"a": "1"}, release)


def test_a_title_field_of_another_name_points_at_the_setting(tmp_path):
    from recbole_llmk.knowledge.reki_release import ReleaseError, read_recbole_titles

    item_file = tmp_path / "mine.item"
    item_file.write_text("item_id:token\tname:token_seq\tyear:token\n1\tToy Story\t1995\n")
    with pytest.raises(ReleaseError, match=r"no field 'movie_title'.*reki_release_title_fields: \[<title field>"):
        read_recbole_titles(str(item_file))
    assert read_recbole_titles(str(item_file), "name", "year") == {"1": ("Toy Story", 1995)}
