"""Raw data -> RecBole atomic files (ml-1m-u2999), on hand-written files in ML-1M's format."""

import gzip

import pytest

from recbole_llmk.datasets import convert_ml1m_u2999
from recbole_llmk.knowledge.descriptions import Describer, read_atomic


def test_ml1m_u2999_conversion_and_its_text(tmp_path):
    source = tmp_path / "ml-1m"
    (source / "partial").mkdir(parents=True)
    (source / "movies.dat").write_text("1::Toy Story (1995)::Animation|Children's|Comedy\n"
                                       "2::Associate, The (L'Associe)(1982)::Comedy\n", encoding="latin-1")
    (source / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n3000::M::25::1::11111\n")
    with gzip.open(source / "partial" / "ratings_users0001-2999.dat.gz", "wt") as f:
        f.write("1::1::5::978300760\n2::2::3::978302109\n")
    result = convert_ml1m_u2999(str(source), str(tmp_path / "data"))
    assert (result["interactions"], result["users"], result["items"]) == (2, 2, 2)  # user 3000 has no ratings here
    items, types = read_atomic(tmp_path / "data" / "ml-1m-u2999" / "ml-1m-u2999.item")
    assert items["movie_title"].tolist() == ["Toy Story", "Associate, The (L'Associe)"]
    assert items["release_year"].tolist() == ["1995", "1982"] and types["genre"] == "token_seq"
    config = {"dataset_hook": None, "dataset": "ml-1m-u2999", "seq_separator": " ", "field_separator": "\t",
              "data_path": str(tmp_path / "data" / "ml-1m-u2999"), "USER_ID_FIELD": "user_id",
              "ITEM_ID_FIELD": "item_id", "RATING_FIELD": "rating"}
    describer = Describer(type("C", (dict,), {"__getitem__": dict.get})(config))
    assert describer.describe("user")["1"] == "a woman aged under 18 whose occupation is K-12 student"
    assert describer.describe("item")["1"] == "Toy Story (1995), genres: Animation, Children's, Comedy"


def test_conversion_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ratings_users0001-2999.dat.gz"):
        convert_ml1m_u2999(str(tmp_path), str(tmp_path / "out"))
