"""REKI / KAR knowledge: factorization prompting for user preferences and item facts.

Xi et al., "Towards Open-World Recommendation with Knowledge Augmentation from Large Language
Models" (KAR, RecSys 2024) and its journal version REKI. Individual knowledge: one prompt per
user (profile + recent *training* history + scenario factors) and one per item (description +
scenario factors). With ``llm_backend: none`` the descriptions themselves are the knowledge text.
"""

from recbole_llmk.knowledge.descriptions import Describer
from recbole_llmk.knowledge.history import recent_histories, split_fingerprint, training_interactions
from recbole_llmk.knowledge.pipeline import KnowledgePlan, digest, ensure_store, store_settings
from recbole_llmk.knowledge.prompts import PromptTemplate

TECHNIQUE = "REKI"


def _rating(value):
    return f"{value:g}" if isinstance(value, float) else str(value)


class REKIPrompts:
    """Builds REKI's user and item requests from descriptions and training histories."""

    def __init__(self, config, describer=None):
        self.describer = describer or Describer(config)
        self.hook = self.describer.hook
        self.user_template = PromptTemplate.load(config["reki_user_prompt"] or "reki_user")
        self.item_template = PromptTemplate.load(config["reki_item_prompt"] or "reki_item")
        self.factors = ", ".join(config["scenario_factors"] or self.hook.scenario_factors) or "any relevant factors"
        self.history_length = config["history_length"] or 15

    @property
    def digest(self):
        return digest([self.user_template.text, self.item_template.text, self.factors,
                       self.history_length, vars(self.hook)])

    def history_text(self, rows, items):
        template = self.hook.history_item_template if "rating" in rows else "{item}"
        lines = []
        for row in rows.itertuples(index=False):
            values = {"item": items.get(row.item, f"{self.hook.item_noun} {row.item}")}
            if "rating" in rows:
                values["rating"] = _rating(row.rating)
            lines.append("- " + template.format(**values))
        return "\n".join(lines) or "(no history yet)"

    def requests(self, dataset, frame):
        """``{"user": [...], "item": [...]}`` for every user and item id of ``dataset``."""
        from recbole_llmk.knowledge.generation import Request

        frame = self.describer.with_ratings(frame)
        items = self.describer.describe("item")
        profiles = self.describer.describe("user")
        histories = recent_histories(frame, self.history_length)
        common = {"user_noun": self.hook.user_noun, "item_noun": self.hook.item_noun, "factors": self.factors}
        empty = frame.iloc[:0]
        users = []
        for token in dataset.field2id_token[dataset.uid_field][1:]:
            profile = profiles.get(token) or f"a {self.hook.user_noun}"
            history = self.history_text(histories.get(token, empty), items)
            prompt = self.user_template.render(profile=profile, history=history, **common)
            description = f"A {self.hook.user_noun} who is {profile}. Recent {self.hook.item_noun}s:\n{history}"
            users.append(Request(f"user:{token}", prompt, description))
        item_requests = []
        for token in dataset.field2id_token[dataset.iid_field][1:]:
            text = items.get(token) or f"{self.hook.item_noun} {token}"
            item_requests.append(Request(f"item:{token}", self.item_template.render(item=text, **common), text))
        return {"user": users, "item": item_requests}


def reki_requests(config, dataset):
    """REKI's requests for the training dataset ``dataset``, and the store settings they imply."""
    frame = training_interactions(dataset)
    prompts = REKIPrompts(config)
    settings = store_settings(config, TECHNIQUE, split_fingerprint(frame), prompts.digest)
    return settings, lambda: KnowledgePlan.individual(prompts.requests(dataset, frame))


def build_reki_knowledge(config, dataset):
    """The REKI store for this run's training split, built when missing. ``dataset`` is the
    training dataset (``training_dataset(train_data)``)."""
    return ensure_store(config, *reki_requests(config, dataset))
