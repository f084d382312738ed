"""Stage 1 of the knowledge pipeline: how users and items are described in text.

Texts are read from the dataset's RecBole atomic files (``<dataset>.item``, ``<dataset>.user``)
by raw token, independent of the model's ``load_col``: DIN on ml-100k does not load movie titles,
yet its knowledge must name the movies. A dataset hook (``dataset_hooks/<dataset>.yaml``, or any
yaml given as ``dataset_hook``) says how fields read as text; without one, every token and
token_seq field is listed as ``field: value``.
"""

import logging
import os
from dataclasses import dataclass, field

import pandas as pd
import yaml

from recbole_llmk.defaults import setting

HOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "dataset_hooks")
TEXT_TYPES = ("token", "token_seq")
# A user the data gives no profile for (no .user file, or no row): what prompts and texts say.
NO_PROFILE = "known only by their history"
MISSING_TEXT_POLICIES = ("warn", "error")


class MissingTextError(ValueError):
    """The dataset gives no text for users or items (knowledge_missing_text: error)."""


@dataclass
class DatasetHook:
    """Text conventions of one dataset (see ``dataset_hooks/ml-100k.yaml`` for every key)."""

    user_noun: str = "user"
    item_noun: str = "item"
    user_template: str = ""
    item_template: str = ""
    history_item_template: str = "{item} (rating: {rating})"
    list_fields: dict = field(default_factory=dict)
    value_maps: dict = field(default_factory=dict)
    scenario_factors: list = field(default_factory=list)

    @classmethod
    def load(cls, config):
        """The hook named by ``dataset_hook`` (a name or a yaml path), else the dataset's own."""
        name = config["dataset_hook"] or config["dataset"]
        path = name if name.endswith(".yaml") else os.path.join(HOOKS, f"{name}.yaml")
        if not os.path.isfile(path):
            if config["dataset_hook"]:
                raise FileNotFoundError(
                    f"dataset_hook '{config['dataset_hook']}' not found (looked for {path}). "
                    f"Give a yaml path or one of {sorted(os.listdir(HOOKS))}."
                )
            return cls()
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; valid keys are "
                             f"{sorted(cls.__dataclass_fields__)}")
        return cls(**values)


def read_atomic(path, field_separator="\t"):
    """An atomic file as strings, columns renamed from ``name:type`` to ``name``; and the types.

    Read as RecBole reads it: the header's fields only (RecBole passes ``usecols``, so a line with
    a stray extra field is read, not refused), and quotes are plain characters."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\r\n").split(field_separator)
    frame = pd.read_csv(path, sep=field_separator, dtype=str, keep_default_na=False, usecols=header,
                        quoting=3, engine="python" if len(field_separator) > 1 else "c")[header]
    types = {}
    for column in frame.columns:
        name, _, ftype = column.partition(":")
        types[name] = ftype
    untyped = [name for name, ftype in types.items() if not ftype]
    if untyped:
        raise ValueError(f"{path}: header fields {untyped} have no type; RecBole's atomic files name each "
                         f"field name:type (token, token_seq, float, float_seq), e.g. title:token_seq")
    frame.columns = list(types)
    return frame, types


class Describer:
    """Text for every user and item of a dataset, keyed by raw token."""

    def __init__(self, config, hook=None):
        self.hook = hook or DatasetHook.load(config)
        self.seq_separator = config["seq_separator"] or " "
        self.field_separator = config["field_separator"] or "\t"
        self.data_path = config["data_path"]
        self.dataset = config["dataset"]
        self.id_fields = {"user": config["USER_ID_FIELD"], "item": config["ITEM_ID_FIELD"]}
        self.rating_field = config["RATING_FIELD"]
        self.text_files = {"user": config["user_text_file"], "item": config["item_text_file"]}
        self.missing_text = str(setting(config, "knowledge_missing_text")).lower()
        if self.missing_text not in MISSING_TEXT_POLICIES:
            raise ValueError(f"knowledge_missing_text={self.missing_text!r}: choose one of {MISSING_TEXT_POLICIES}")
        self._described = {}

    def _atomic_path(self, kind):
        return os.path.join(self.data_path, f"{self.dataset}.{kind}")

    def _value(self, name, raw):
        if name in self.hook.value_maps:
            raw = str(self.hook.value_maps[name].get(raw, raw))
        if name in self.hook.list_fields:
            raw = self.hook.list_fields[name].join(t for t in raw.split(self.seq_separator) if t)
        return raw

    def _render(self, template, row, names):
        if template:
            return template.format(**{n: self._value(n, row[n]) for n in names}).strip()
        return "; ".join(f"{n}: {self._value(n, row[n])}" for n in names if row[n] != "")

    def describe(self, kind):
        """``{token: text}`` for ``kind`` in (user, item); empty when the dataset has no such file
        (said once, as a warning or an error: ``knowledge_missing_text``)."""
        if kind not in self._described:
            self._described[kind] = self._read_descriptions(kind)
        return self._described[kind]

    def _read_descriptions(self, kind):
        if self.text_files[kind]:
            return read_text_file(self.text_files[kind], f"{kind}_text_file")
        path = self._atomic_path(kind)
        if not os.path.isfile(path):
            self._no_text(kind, f"there is no {path}")
            return {}
        frame, types = read_atomic(path, self.field_separator)
        id_field = self.id_fields[kind]
        if id_field not in frame:
            raise ValueError(f"{path}: no '{id_field}' column (the {kind} id field in the config)")
        names = [n for n, t in types.items() if t in TEXT_TYPES and n != id_field]
        template = getattr(self.hook, f"{kind}_template")
        missing = [n for n in _placeholders(template) if n not in frame]
        if missing:
            raise ValueError(f"{kind}_template of the dataset hook uses fields {missing} "
                             f"that {path} does not have (it has {list(frame.columns)})")
        names = _placeholders(template) or names
        if not names:
            self._no_text(kind, f"{path} has no token or token_seq field besides {id_field}")
            return {}
        return {row[id_field]: self._render(template, row, names) for _, row in frame.iterrows()}

    def _no_text(self, kind, why):
        """A dataset without text for ``kind``: its knowledge can only name ids and history."""
        what = (f"every {self.hook.item_noun} is named only by its id ('{self.hook.item_noun} 42'), so item "
                f"knowledge carries no content" if kind == "item" else
                f"every {self.hook.user_noun} is {NO_PROFILE}")
        message = (f"{self.dataset}: no {kind} text ({why}): {what}. Give the {kind}s text fields in the "
                   f".{kind} atomic file (or a dataset hook: dataset_hook), or a CSV/TSV of id and text as "
                   f"{kind}_text_file; knowledge_missing_text=error stops here.")
        if self.missing_text == "error":
            raise MissingTextError(message)
        logging.getLogger().warning(message)

    def history_text(self, rows, items):
        """One line per interaction of ``rows`` (oldest first), with its rating when known."""
        template = self.hook.history_item_template if "rating" in rows else "{item}"
        lines = []
        for row in rows.itertuples(index=False):
            values = {"item": items.get(row.item, f"{self.hook.item_noun} {row.item}")}
            if "rating" in rows:
                values["rating"] = _rating(row.rating)
            lines.append("- " + template.format(**values))
        return "\n".join(lines) or "(no history yet)"

    def user_contexts(self, frame, users, length):
        """``{user: (profile, history text)}`` for ``users``: the profile from the ``.user`` file
        and the user's last ``length`` interactions of ``frame`` (a *training* frame, see
        ``history.training_interactions``), with ratings as the raw file gives them (RecBole may
        have dropped or rescaled them, see ``with_ratings``)."""
        from recbole_llmk.knowledge.history import recent_histories

        frame = self.with_ratings(frame)
        items = self.describe("item")
        profiles = self.describe("user")
        histories = recent_histories(frame, length)
        empty = frame.iloc[:0]
        return {u: (profiles.get(u) or NO_PROFILE, self.history_text(histories.get(u, empty), items))
                for u in users}

    def user_text(self, profile, history):
        """A user as plain text: profile and recent history (knowledge when no LLM is used)."""
        return f"A {self.hook.user_noun} who is {profile}. Recent {self.hook.item_noun}s:\n{history}"

    def with_ratings(self, frame):
        """``frame`` with each interaction's rating as the raw ``.inter`` file gives it.

        RecBole drops the rating column when ``threshold`` turns it into a label (the ml-100k CTR
        default) and rescales it to [0, 1] under ``normalize_all`` (ml-100k's dataset default,
        which DIN and DIEN keep), yet prompts show ratings and likes are ratings over a threshold
        on the dataset's own scale. Only pairs already in ``frame`` (the training split) are
        looked up, so the raw file can replace a value, never add an interaction."""
        path = self._atomic_path("inter")
        if not self.rating_field or not os.path.isfile(path):
            return frame
        raw, _ = read_atomic(path, self.field_separator)
        if self.rating_field not in raw:
            return frame
        users, items = self.id_fields["user"], self.id_fields["item"]
        raw = raw[[users, items, self.rating_field]].drop_duplicates([users, items], keep="last")
        raw.columns = ["user", "item", "rating"]
        raw["rating"] = pd.to_numeric(raw["rating"], errors="coerce")
        return frame.drop(columns=["rating"], errors="ignore").merge(raw, on=["user", "item"], how="left")


def read_text_file(path, setting):
    """``{id: text}`` from a plain CSV (``.csv``) or TSV file with a header: the first column is the
    raw id as in the dataset's atomic files; one more column is the text itself, several are
    written ``name: value; ...``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{setting}={path!r} does not exist (a CSV or TSV file: id column, then text)")
    frame = pd.read_csv(path, sep="," if path.lower().endswith(".csv") else "\t", dtype=str, keep_default_na=False)
    if frame.shape[1] < 2:
        raise ValueError(f"{setting}={path!r}: needs a header and at least two columns (id, text); "
                         f"found {list(frame.columns)}")
    ids, names = frame.columns[0], list(frame.columns[1:])
    if len(names) == 1:
        return dict(zip(frame[ids], frame[names[0]].str.strip()))
    return {row[ids]: "; ".join(f"{n}: {row[n]}" for n in names if row[n] != "") for _, row in frame.iterrows()}


def _rating(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


def _placeholders(template):
    import string

    return [name for _, name, _, _ in string.Formatter().parse(template or "") if name]
