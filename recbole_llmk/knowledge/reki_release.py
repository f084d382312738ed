"""Import the REKI authors' released collective knowledge for MovieLens-1M.

The release (``data/ml-1m/proc_data/group_data`` of the REKI repository) holds 377 real
gpt-3.5-turbo-0613 answers: one per item cluster (107) and one per user cluster, built once from
the users' liked items ("positive", 135) and once from their disliked items ("negative", 135).
Each line of ``*/knowledge.json`` is one chat.completion object; its ``prompt`` field is the
cluster id (a string) and ``prompt_txt`` the prompt sent, identical to ``group_prompt.json``.

**The ids in the release are not MovieLens ids.** The REKI/KAR preprocessing
(``preprocess_ml-1m.py`` of the KAR repository) renumbers users and items: with
``random.seed(1234)`` it shuffles the users (in their order in ratings.dat, i.e. 1..6040) and
numbers them 1.. in shuffled order; items are numbered 1.. in order of first appearance while
walking the shuffled users' histories, each sorted by rating date. So ``id2group.json`` (keys
1..3706) and ``id2pos_neg_group.json`` (keys 1..6040) are keyed by those internal ids, and
``id2pos_neg_group.json`` stores ``[negative cluster, positive cluster]`` (the authors' README says
so, and index 0 equals ``user/negative/result/id2group.json`` for all 6040 users).

What this module derives from that, and how sure it is:

* users: the user renumbering depends on nothing but the seed, so ``user_clusters`` is keyed by
  real ML-1M user ids (:func:`kar_user_order`). Checked on the ratings of users 1-2999: users the
  release puts in one cluster share more liked items than random pairs under this mapping
  (Jaccard 0.072 vs 0.047), and not under the identity (0.049 vs 0.047).
* items: the prompts name every cluster's items by title, so the 1,193 movies the item prompts list
  get their cluster exactly (``item_cluster``); the other item ids of ``id2group.json`` can only be
  translated with the complete ratings.dat (:func:`kar_item_order`), which the shared data lack
  (with ratings of users 1-2999 only the first shuffled user's 146 movies are placed exactly; the
  42 of them the prompts also name all agree, which confirms the renumbering). Given a ratings
  file, the translation is used as far as it is exact and every movie it places is cross-checked
  against the prompt-derived clusters (any disagreement is an error).
* user cluster representatives: the items each user-cluster prompt lists (REKI Eq. 1: 15 for 233
  of the 270 clusters, fewer for the rest), resolved from their titles.
  ``user/*/item_grouplist.json`` is kept as-is (internal item ids; roughly the union of the
  members' liked resp. disliked items: 92% resp. 80% of the members' ratings are found there).

15 user clusters (6 positive, 9 negative) have no items in the release: their prompts list no
movie ("Given a set of movies consisting of  please describe ...") and are identical, so a replay
keyed by prompt text returns one of their (generic) answers for all of them.
"""

import datetime as dt
import gzip
import hashlib
import json
import logging
import os
import random
import re
import unicodedata
from dataclasses import dataclass, field

from recbole_llmk.files import written_whole

KINDS = ("item", "positive", "negative")
KIND_DIRS = {"item": "item", "positive": os.path.join("user", "positive"), "negative": os.path.join("user", "negative")}
PROMPT_HEAD = "Given a set of movies consisting of "
PROMPT_TAIL = " please describe"
KAR_SEED = 1234
KAR_UTC_OFFSET_HOURS = 8  # rating dates as the authors' machine saw them (only ties within a day depend on it)
ARTICLES = ("the", "a", "an")


class ReleaseError(ValueError):
    """The release folder (or a file it needs) is missing or not what this module expects."""


# --- reading the release ------------------------------------------------------------------------


def _required_files(root):
    files = {"item_groups": os.path.join("item", "result", "id2group.json"),
             "user_groups": os.path.join("user", "id2pos_neg_group.json")}
    for kind in KINDS:
        files[f"{kind}_prompts"] = os.path.join(KIND_DIRS[kind], "group_prompt.json")
        files[f"{kind}_knowledge"] = os.path.join(KIND_DIRS[kind], "knowledge.json")
    for side in ("positive", "negative"):
        files[f"{side}_items"] = os.path.join(KIND_DIRS[side], "item_grouplist.json")
    return {name: os.path.join(root, path) for name, path in files.items()}


def _check_folder(root):
    """{name: path} of the release files; one error naming every missing file."""
    if not os.path.isdir(root):
        raise ReleaseError(f"{root} is not a folder: pass the release's group_data folder "
                           f"(data/ml-1m/proc_data/group_data of the REKI repository)")
    files = _required_files(root)
    missing = [path for path in files.values() if not os.path.isfile(path)]
    if missing:
        raise ReleaseError(f"the REKI release in {root} is incomplete; missing: {', '.join(missing)}")
    return files


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as exc:
        raise ReleaseError(f"{path} is not valid JSON: {exc}") from exc


def _int_keys(mapping, path):
    try:
        return {int(key): value for key, value in mapping.items()}
    except (AttributeError, ValueError) as exc:
        raise ReleaseError(f"{path}: expected an object keyed by integer ids") from exc


def _read_int_keyed(files, name):
    return _int_keys(_read_json(files[name]), files[name])


def _read_texts(files):
    """({(kind, cluster): prompt}, {(kind, cluster): completion text}, model name)."""
    prompts, texts, models = {}, {}, set()
    for kind in KINDS:
        kind_prompts = _read_int_keyed(files, f"{kind}_prompts")
        for cluster, (text, model) in _read_completions(files[f"{kind}_knowledge"], kind_prompts).items():
            prompts[(kind, cluster)] = kind_prompts[cluster]
            texts[(kind, cluster)] = text
            models.add(model)
    return prompts, texts, ",".join(sorted(m for m in models if m)) or "unknown"


def _read_completions(path, prompts):
    """{cluster: (text, model)} from one knowledge.json, checked against the cluster's prompt."""
    answers = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
                cluster = int(record["prompt"])
                text = record["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError) as exc:
                raise ReleaseError(f"{where}: expected a chat.completion with 'prompt' (the cluster id) and "
                                   f"choices[0].message.content ({exc.__class__.__name__}: {exc})") from exc
            if cluster not in prompts:
                raise ReleaseError(f"{where}: cluster {cluster} has no prompt in group_prompt.json")
            if record.get("prompt_txt", prompts[cluster]) != prompts[cluster]:
                raise ReleaseError(f"{where}: prompt_txt differs from group_prompt.json for cluster {cluster}")
            if cluster in answers:
                raise ReleaseError(f"{where}: a second completion for cluster {cluster}")
            answers[cluster] = (text, record.get("model"))
    missing = sorted(set(prompts) - set(answers))
    if missing:
        raise ReleaseError(f"{path}: no completion for clusters {missing[:10]} ({len(missing)} in all)")
    return answers


def prompt_titles(prompt):
    """The movie titles a REKI cluster prompt lists, in order ([] for an empty cluster).

    Titles are joined by ", " and end with their year, e.g. "..., The Thin Blue Line (1988), ...";
    a title's own commas are never followed by a parenthesised year, so splitting after
    "(yyyy), " is unambiguous."""
    if not prompt.startswith(PROMPT_HEAD) or PROMPT_TAIL not in prompt:
        raise ReleaseError(f"not a REKI cluster prompt: {prompt[:80]!r}")
    body = prompt[len(PROMPT_HEAD):prompt.index(PROMPT_TAIL)].strip()
    body = body[:-1] if body.endswith(",") else body
    return [title.strip() for title in re.split(r"(?<=\(\d{4}\)), ", body) if title.strip()]


# --- MovieLens titles ---------------------------------------------------------------------------


def kar_title(title):
    """A movies.dat title as KAR's prompts write it: "Thin Blue Line, The (1988)" ->
    "The Thin Blue Line (1988)" (only for "The"/"A", and only for titles with one parenthesis)."""
    parts = title.strip().split("(")
    if len(parts) != 2:
        return title
    pure, year = parts
    words = pure.strip().split(",")
    if words[-1].strip().lower() in ("the", "a"):
        return f"{words[-1].strip()} {','.join(words[:-1])} ({year}"
    return title


def read_movies(movies_dat):
    """{ML-1M movie id (str): (title without year, year)} from movies.dat (latin-1, "::")."""
    if not os.path.isfile(movies_dat):
        raise ReleaseError(f"{movies_dat} not found (MovieLens-1M movies.dat)")
    movies = {}
    with open(movies_dat, encoding="latin-1") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split("::")
            match = re.match(r"^(.*?)\s*\((\d{4})\)\s*$", fields[1] if len(fields) == 3 else "")
            if not match:
                raise ReleaseError(f"{movies_dat} line {number}: expected 'id::Title (year)::genres'")
            movies[fields[0]] = (match.group(1), int(match.group(2)))
    return movies


def _full_title(title, year):
    return f"{title} ({year})"


def _strip_accents(text):
    return "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))


def _simple_key(title):
    """Lower case, ", The" suffix moved to the front, punctuation and spaces dropped."""
    text = _strip_accents(title).lower().strip()
    match = re.match(r"^(.*),\s*(the|a|an)$", text)
    if match:
        text = f"{match.group(2)} {match.group(1)}"
    return re.sub(r"[^a-z0-9]", "", text)


def _canonical(title):
    """Words of a title without a leading or trailing article, accents, punctuation; & = and."""
    text = _strip_accents(title).lower().replace("&", " and ")
    match = re.match(r"^(.*),\s*(the|a|an|la|le|les|l'|il|el|der|die|das|det)$", text.strip())
    if match:
        text = match.group(1)
    words = re.findall(r"[a-z0-9]+", text)
    while words and words[0] in ARTICLES:
        words = words[1:]
    return " ".join(words)


def title_variants(title):
    """Keys a title may be known by: the main title and each alternate title in parentheses
    ("Seven (Se7en)" -> "seven", "se7en"), each without articles, accents or punctuation."""
    alternates = re.findall(r"\(([^()]*)\)", title)
    main = re.sub(r"\([^()]*\)", " ", title)
    keys = [_canonical(main)] + [_canonical(a) for a in alternates] + [_canonical(title)]
    return [key for key in dict.fromkeys(keys) if key]


class TitleIndex:
    """ML-1M movies looked up by normalized title and year (see :func:`match_items_by_title`)."""

    def __init__(self, movies):
        self.strict, self.loose = {}, {}
        for movie_id, (title, year) in movies.items():
            self.strict.setdefault((_simple_key(title), year), set()).add(movie_id)
            for key in title_variants(title):
                self.loose.setdefault((key, year), set()).add(movie_id)

    def match(self, title, year, year_tolerance=1, alternates=True):
        """The one ML-1M movie id (str) ``title``/``year`` names, or None (unknown or ambiguous).

        A missing year is taken from a trailing "(yyyy)" of the title, if there is one."""
        year = _as_year(year)
        if year is None and title:
            found_year = re.match(r"^(.*?)\s*\((\d{4})\)\s*$", title)
            title, year = (found_year.group(1), int(found_year.group(2))) if found_year else (title, None)
        if year is None or not title:
            return None
        found = _unique(self.strict.get((_simple_key(title), year)))
        if found is not None or not alternates:
            return found
        keys = title_variants(title)
        for offset in [0] + [d for k in range(1, int(year_tolerance) + 1) for d in (-k, k)]:
            candidates = set().union(*(self.loose.get((key, year + offset), set()) for key in keys))
            if candidates:
                return _unique(candidates)  # ambiguous: do not guess
        return None


def match_items_by_title(movies_dat_path, target_titles, year_tolerance=1, alternates=True):
    """{target token: ML-1M movie id (str)} by normalized title and year.

    ``target_titles``: {token: (title, year)} (year None or not a number: not matched). Three
    tiers, each taking only a unique candidate: (1) the whole title, lower case, ", The" moved to
    the front, punctuation dropped, same year (this tier alone gives the 1,625 ml-100k matches
    quoted in the shared data README); (2) any of the main and alternate titles without articles,
    accents or punctuation, same year (catches "Seven (Se7en)" vs "Seven", "Big Blue, The (Grand
    bleu, Le)" vs "Big Blue, The (Le Grand Bleu)"); (3) as (2) with the year off by at most
    ``year_tolerance`` (ml-100k's years are release dates, ML-1M's title years). Ambiguous
    candidates are left unmatched rather than guessed. ``alternates=False`` keeps tier (1) only.

    ml-100k: 1,661 of 1,682 movies match (1,625 with tier 1 alone); the 1,661 cover 1,643
    distinct ML-1M movies, as ml-100k lists 18 movies twice."""
    index = TitleIndex(read_movies(movies_dat_path))
    matched = {}
    for token, (title, year) in target_titles.items():
        movie = index.match(title, year, year_tolerance, alternates)
        if movie is not None:
            matched[token] = movie
    return matched


def _as_year(year):
    try:
        return int(year)
    except (TypeError, ValueError):
        return None


def _unique(candidates):
    return next(iter(candidates)) if candidates and len(candidates) == 1 else None


def read_recbole_titles(item_file, title_field="movie_title", year_field="release_year"):
    """{item token: (title, year)} from a RecBole atomic .item file (e.g. ml-100k.item)."""
    if not os.path.isfile(item_file):
        raise ReleaseError(f"{item_file} not found: matching the released knowledge by title needs the dataset's "
                           f".item file with titles and years (or reki_release_match: id)")
    with open(item_file, encoding="utf-8") as f:
        header = [name.split(":")[0] for name in f.readline().rstrip("\n").split("\t")]
        if "item_id" not in header:
            raise ReleaseError(f"{item_file}: no field 'item_id' in the header {header}")
        for name in (title_field, year_field):
            if name not in header:
                raise ReleaseError(
                    f"{item_file}: no field {name!r} in the header {header}; the released knowledge is matched by "
                    f"title and year: name this dataset's fields with reki_release_title_fields: [<title field>, "
                    f"<year field>] (now [{title_field}, {year_field}]), or match by ML-1M id "
                    f"(reki_release_match: id)")
        columns = [header.index(name) for name in ("item_id", title_field, year_field)]
        titles = {}
        for line in f:
            values = line.rstrip("\n").split("\t")
            if len(values) >= len(header):
                token, title, year = (values[k] for k in columns)
                titles[token] = (title, _as_year(year))
    return titles


# --- the KAR/REKI renumbering -------------------------------------------------------------------


def kar_user_order(n_users, seed=KAR_SEED):
    """ML-1M user ids (str) in KAR's shuffled order: internal user id k+1 is element k.

    KAR collects users in their order in ratings.dat (1..6040: the file is sorted by user), calls
    ``random.seed(1234)`` and ``random.shuffle`` on that list; a private ``random.Random(1234)``
    gives the same sequence without touching the global random state."""
    users = [str(u) for u in range(1, int(n_users) + 1)]
    random.Random(seed).shuffle(users)
    return users


def _open_text(path):
    return gzip.open(path, "rt", encoding="latin-1") if str(path).endswith(".gz") else open(path, encoding="latin-1")


def kar_item_order(ratings_dat, user_order, utc_offset_hours=KAR_UTC_OFFSET_HOURS):
    """{internal item id: ML-1M movie id (str)}, as far as ``ratings_dat`` determines it exactly.

    Items are numbered in order of first appearance along ``user_order``, each user's ratings
    sorted by rating *date* (a stable sort: same-day ratings keep their file order). A user with
    no rating in the file (a partial ratings.dat) makes every later number unknown, so the walk
    stops there: with the complete file all 3,706 items are placed, with the shared data's users
    1-2999 only the first shuffled user's 146 items are."""
    if not os.path.isfile(ratings_dat):
        raise ReleaseError(f"{ratings_dat} not found (MovieLens-1M ratings.dat)")
    tz = dt.timezone(dt.timedelta(hours=utc_offset_hours))
    histories = {}
    with _open_text(ratings_dat) as f:
        for number, line in enumerate(f, start=1):
            fields = line.strip().split("::")
            if len(fields) != 4:
                if line.strip():
                    raise ReleaseError(f"{ratings_dat} line {number}: expected 'user::movie::rating::timestamp'")
                continue
            user, movie, _, stamp = fields
            histories.setdefault(user, []).append((dt.datetime.fromtimestamp(int(stamp), tz).date(), movie))
    order, seen = {}, set()
    for user in user_order:
        if user not in histories:
            break
        for _, movie in sorted(histories[user], key=lambda pair: pair[0]):
            if movie not in seen:
                seen.add(movie)
                order[len(order) + 1] = movie
    return order


# --- the released knowledge ---------------------------------------------------------------------


def default_movies_dat(root):
    """movies.dat where it usually sits relative to the release: KAR's raw_data folder, or the
    ml-1m folder next to the reki folder in this project's shared data."""
    for relative in ("movies.dat", os.path.join("..", "..", "raw_data", "movies.dat"),
                     os.path.join("..", "..", "..", "..", "ml-1m", "movies.dat")):
        path = os.path.normpath(os.path.join(root, relative))
        if os.path.isfile(path):
            return path
    return None


@dataclass
class ReleasedKnowledge:
    """The release, parsed and checked; see the module docstring for what each id means.

    Keyed by internal (release) ids: ``item_cluster_internal`` {item id: cluster},
    ``user_clusters_internal`` {user id: (positive, negative)}, ``member_items_internal``
    {(side, cluster): [item ids]}. Keyed by ML-1M ids (str): ``item_cluster`` {movie: cluster},
    ``user_clusters`` {user: (positive, negative)}, ``representatives`` {(side, cluster):
    [movies]}. ``texts`` / ``prompts`` {(kind, cluster): text}, kind in item/positive/negative.
    ``unresolved_titles``: prompt titles no movies.dat entry matched (none in the ML-1M release).
    """

    root: str
    model: str
    texts: dict
    prompts: dict
    item_cluster_internal: dict
    user_clusters_internal: dict
    member_items_internal: dict
    user_clusters: dict
    item_cluster: dict = field(default_factory=dict)
    representatives: dict = field(default_factory=dict)
    movies_dat: str = None
    unresolved_titles: list = field(default_factory=list)

    @classmethod
    def load(cls, root, movies_dat=None, ratings_dat=None):
        """Parse the release in ``root`` (its group_data folder).

        ``movies_dat`` (default: looked up next to the release) resolves prompt titles to ML-1M
        movie ids; without it the ML-1M-keyed item fields stay empty. ``ratings_dat`` (optional,
        the complete ML-1M ratings.dat, .gz accepted) extends ``item_cluster`` to every item it
        places exactly (:func:`kar_item_order`)."""
        root = os.fspath(root)
        files = _check_folder(root)
        prompts, texts, model = _read_texts(files)
        item_internal = _read_int_keyed(files, "item_groups")
        users_internal = {user: _pos_neg(pair, files["user_groups"], user)
                          for user, pair in _read_int_keyed(files, "user_groups").items()}
        members = {(side, cluster): list(items) for side in ("positive", "negative")
                   for cluster, items in _read_int_keyed(files, f"{side}_items").items()}
        release = cls(root=root, model=model, texts=texts, prompts=prompts, item_cluster_internal=item_internal,
                      user_clusters_internal=users_internal, member_items_internal=members,
                      user_clusters=_users_by_ml1m_id(users_internal, files))
        release._check_clusters_have_text()
        movies_dat = movies_dat or default_movies_dat(root)
        if movies_dat:
            release._resolve_titles(os.fspath(movies_dat))
        else:
            logging.getLogger().warning(f"no movies.dat given or found next to {root}: prompt titles are not "
                                        f"resolved to ML-1M movie ids (item_cluster and representatives are empty)")
        if ratings_dat:
            release._add_ratings_order(os.fspath(ratings_dat))
        return release

    # -- derived views --

    def fingerprint(self):
        """A digest of what the release says (answers, prompts, memberships, resolved titles), not
        of where it lies: knowledge built from it is reused when the folder is moved or copied to
        another machine, and rebuilt when an answer or a membership changes."""
        parts = (self.texts, self.prompts, self.item_cluster_internal, self.user_clusters_internal,
                 self.member_items_internal, self.user_clusters, self.item_cluster, self.representatives)
        content = [self.model] + [sorted((str(key), value) for key, value in part.items()) for part in parts]
        return hashlib.sha256(json.dumps(content, default=str).encode()).hexdigest()[:12]

    def replay_records(self):
        """[{"prompt", "response"}] for all completions, the shape the replay backend reads
        (:func:`recbole_llmk.knowledge.llm_replay.load_recordings`). Note: the raw knowledge.json
        lines are *not* replayable as they are: their ``prompt`` field is the cluster id."""
        return [{"prompt": self.prompts[key], "response": self.texts[key], "cluster": f"{key[0]}:{key[1]}",
                 "model": self.model} for key in sorted(self.texts, key=lambda k: (KINDS.index(k[0]), k[1]))]

    def write_replay_file(self, path):
        """Write :meth:`replay_records` as JSONL (``llm_replay_file``); -> the number of lines."""
        records = self.replay_records()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # runs that start at once (benchmark cells, --jobs) write the same file while others replay
        # it: each writes its own copy and swaps it in whole, so no reader sees a half-written file
        with written_whole(path, per_process=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        return len(records)

    def counts(self):
        """Completions per kind, e.g. {"item": 107, "positive": 135, "negative": 135}."""
        return {kind: sum(1 for k in self.texts if k[0] == kind) for kind in KINDS}

    # -- loading steps --

    def _check_clusters_have_text(self):
        needed = {("item", c) for c in self.item_cluster_internal.values()}
        for positive, negative in self.user_clusters_internal.values():
            needed |= {("positive", positive), ("negative", negative)}
        lacking = sorted(needed - set(self.texts))
        if lacking:
            raise ReleaseError(f"{self.root}: {len(lacking)} clusters that users or items belong to have no "
                               f"completion, e.g. {lacking[:5]}")

    def _resolve_titles(self, movies_dat):
        """Item clusters and user-cluster representatives by the titles the prompts list."""
        self.movies_dat = movies_dat
        movies = read_movies(movies_dat)
        by_title = {}
        for movie_id, (title, year) in movies.items():
            full = _full_title(title, year)
            for form in (full, kar_title(full)):
                by_title.setdefault(form, set()).add(movie_id)
        index = TitleIndex(movies)
        for (kind, cluster), prompt in sorted(self.prompts.items(), key=lambda kv: (KINDS.index(kv[0][0]), kv[0][1])):
            ids = []
            for title in prompt_titles(prompt):
                movie = _unique(by_title.get(title)) or _loose_title(title, index)
                if movie is None:
                    self.unresolved_titles.append((kind, cluster, title))
                    continue
                ids.append(movie)
            if kind == "item":
                for movie in ids:
                    if self.item_cluster.get(movie, cluster) != cluster:
                        raise ReleaseError(f"{self.root}: movie {movie} is listed by item clusters "
                                           f"{self.item_cluster[movie]} and {cluster}")
                    self.item_cluster[movie] = cluster
            else:
                self.representatives[(kind, cluster)] = ids

    def _add_ratings_order(self, ratings_dat):
        order = kar_user_order(len(self.user_clusters_internal))
        placed = kar_item_order(ratings_dat, order)
        conflicts = [(movie, self.item_cluster[movie], self.item_cluster_internal.get(internal))
                     for internal, movie in placed.items()
                     if self.item_cluster.get(movie, self.item_cluster_internal.get(internal))
                     != self.item_cluster_internal.get(internal)]
        if conflicts:
            raise ReleaseError(f"{ratings_dat}: the renumbered items disagree with the clusters the prompts name "
                               f"for {len(conflicts)} movies (e.g. movie, prompt cluster, renumbered cluster: "
                               f"{conflicts[:3]}); this is not the ratings.dat the release was built from")
        for internal, movie in placed.items():
            if internal in self.item_cluster_internal:
                self.item_cluster.setdefault(movie, self.item_cluster_internal[internal])
        logging.getLogger().info(f"{ratings_dat}: {len(placed)} of {len(self.item_cluster_internal)} release items "
                                 f"renumbered exactly; {len(self.item_cluster)} ML-1M movies have an item cluster")


def _loose_title(title, index):
    """A prompt title that is not a movies.dat title verbatim, matched by normalized title + year."""
    match = re.match(r"^(.*?)\s*\((\d{4})\)$", title)
    return index.match(match.group(1), match.group(2), year_tolerance=0) if match else None


def _pos_neg(pair, path, user):
    """(positive, negative) from the file's [negative, positive] pair."""
    if not isinstance(pair, list) or len(pair) != 2:
        raise ReleaseError(f"{path}: user {user}: expected [negative cluster, positive cluster], got {pair!r}")
    negative, positive = pair
    return int(positive), int(negative)


def _users_by_ml1m_id(users_internal, files):
    """{ML-1M user id: (positive, negative)} through KAR's user renumbering."""
    n_users = len(users_internal)
    if sorted(users_internal) != list(range(1, n_users + 1)):
        raise ReleaseError(f"{files['user_groups']}: expected the internal user ids 1..{n_users}")
    order = kar_user_order(n_users)
    return {order[internal - 1]: clusters for internal, clusters in users_internal.items()}


# --- using the release on another dataset -------------------------------------------------------


def _require_titles(released):
    if released.movies_dat is None:
        raise ReleaseError("the release was loaded without movies.dat, so its prompts' movies have no ML-1M ids: "
                           "pass movies_dat to ReleasedKnowledge.load")


def item_clusters_for(target_item_to_ml1m, released):
    """{target token: item cluster or None} through a title match (:func:`match_items_by_title`).

    A token gets a cluster when its ML-1M movie is one the release places (``item_cluster``);
    tokens without a match, or whose movie the release does not place, get None."""
    _require_titles(released)
    return {token: (released.item_cluster.get(str(movie)) if movie is not None else None)
            for token, movie in target_item_to_ml1m.items()}


def _best_overlap(items, index, sizes):
    """(cluster, shared items) with the largest Jaccard overlap; None when nothing is shared.

    Ties: more shared items, then the smaller cluster id (deterministic)."""
    shared = {}
    for item in items:
        for cluster in index.get(item, ()):
            shared[cluster] = shared.get(cluster, 0) + 1
    if not shared:
        return None
    return min(shared, key=lambda c: (-shared[c] / (len(items) + sizes[c] - shared[c]), -shared[c], c))


def assign_users_by_overlap(released, user_histories):
    """{user: (positive cluster or None, negative cluster or None)} for users who are not ML-1M's.

    ``user_histories``: {user: (liked ML-1M movie ids, disliked ML-1M movie ids)}, from the
    user's *training* interactions only. A user's liked items are compared with every positive
    cluster's representative items (the movies its prompt lists), the disliked ones with every
    negative cluster's; the cluster with the largest Jaccard overlap wins (Jaccard rather than a
    raw count so that a short representative list is not at a disadvantage; ties: more shared
    items, then the smaller cluster id). No shared item: None."""
    _require_titles(released)
    indexes, sizes = {}, {}
    for (side, cluster), items in released.representatives.items():
        unique = set(map(str, items))
        sizes.setdefault(side, {})[cluster] = len(unique)
        for item in unique:
            indexes.setdefault(side, {}).setdefault(item, []).append(cluster)
    assigned = {}
    for user, (liked, disliked) in user_histories.items():
        assigned[user] = tuple(
            _best_overlap(set(map(str, items)), indexes.get(side, {}), sizes.get(side, {}))
            for side, items in (("positive", liked), ("negative", disliked)))
    return assigned
