"""The contract every technique implements, and the one ``prepare_knowledge`` they share.

A technique (REKI, ReLand, LEARN, LEARN's features) is a mixin of the model classes it makes. It
says:

- ``technique``: its name, which picks ``properties/technique/<technique>.yaml``;
- ``store_technique``: the kind of store its model reads (default: ``technique``);
- ``knowledge_plan(config, dataset)``: for the training dataset, ``(store settings, make_plan)``
  where ``make_plan()`` returns the :class:`~recbole_llmk.knowledge.pipeline.KnowledgePlan`
  (requests, layout, texts); or ``None`` when the run needs no knowledge (an ID-only ablation).

Everything else is shared: the knowledge pipeline builds the store the settings name, once
(prompts, generation, encoding, store), and the quick start calls ``prepare_knowledge`` before the
model is built. A model family that needs something of the base model (ID tables to fuse into)
adds ``check_fits``, which runs first, before any knowledge is built.

Each store's path is recorded under its kind in ``config["knowledge_stores"]`` (a model that
composes techniques reads several; :func:`built_store_path`), and the last one built in
``config["knowledge_store"]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Optional

from recbole_llmk.knowledge.history import training_dataset

if TYPE_CHECKING:
    from recbole.config import Config
    from recbole.data.dataloader import AbstractDataLoader
    from recbole.data.dataset import Dataset

    from recbole_llmk.knowledge.generation import Request
    from recbole_llmk.knowledge.pipeline import KnowledgePlan
    from recbole_llmk.knowledge.store import KnowledgeStore

# What ``knowledge_plan`` returns: the store's settings (what it must match to be reused) and a
# function that makes the plan, called only when the store is built; or None (no knowledge).
Planned = Optional["tuple[dict, Callable[[], KnowledgePlan]]"]


class KnowledgeTechnique:
    technique: Optional[str] = None
    store_technique: Optional[str] = None

    @classmethod
    def knowledge_plan(cls, config: Config, dataset: Dataset) -> Planned:
        raise NotImplementedError(f"{cls.__name__} implements no knowledge_plan")

    @classmethod
    def prepare_knowledge(cls, config: Config, train_data: AbstractDataLoader) -> Optional[KnowledgeStore]:
        """Check that the model fits, then build (or reuse) the run's store (:meth:`build_store`)."""
        if hasattr(cls, "check_fits"):
            cls.check_fits(config, train_data._dataset)
        return cls.build_store(config, train_data)

    @classmethod
    def build_store(cls, config: Config, train_data: AbstractDataLoader) -> Optional[KnowledgeStore]:
        """Build (or reuse) this technique's store and record its path (:func:`built_store_path`)."""
        from recbole_llmk.knowledge.pipeline import ensure_store

        planned = cls.knowledge_plan(config, training_dataset(train_data))
        if planned is None:
            return None
        store = ensure_store(config, *planned)
        if store is not None:  # None: an encoding shard (--run=knowledge --encoding_shard=[i,N]) writes no store
            config["knowledge_stores"] = dict(config["knowledge_stores"] or {}, **{cls.store_technique: store.path})
            config["knowledge_store"] = store.path
        return store

    @classmethod
    def knowledge_requests(cls, config: Config, train_data: AbstractDataLoader) -> dict[str, list[Request]]:
        """``{"all": [Request]}`` the run's knowledge needs (for batch export and import)."""
        planned = cls.knowledge_plan(config, training_dataset(train_data))
        return {"all": planned[1]().requests if planned else []}


def built_store_path(config: Config, store_technique: str) -> str:
    """The path of the run's store of kind ``store_technique`` (``build_store`` recorded it)."""
    path = (config["knowledge_stores"] or {}).get(store_technique)
    if path is None:
        raise ValueError(f"no {store_technique} knowledge store was built for this run: build the model's "
                         "knowledge first (the quick start's prepare_knowledge, or --run=knowledge)")
    return path


def technique_parts(model_class) -> list:
    """``[(prefix, technique)]`` of a model class, in the order its knowledge enters: the variant's
    own technique (prefix ``""``), or each technique a composed model names (``parts``,
    :mod:`recbole_llmk.model.composed`), the later ones prefixing the modules they add to the
    model with their name (``reki_hein``, ``learn_knowledge``)."""
    parts = getattr(model_class, "parts", None)
    if parts is None:
        return [("", model_class)]
    return [("" if i == 0 else f"{part.technique.lower()}_", part) for i, part in enumerate(parts)]
