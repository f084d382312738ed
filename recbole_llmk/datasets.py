"""Raw data -> RecBole atomic files, for datasets RecBole does not ship.

    python -m recbole_llmk.datasets ml-1m-u2999 --source ../shared/data/ml-1m --out dataset

writes ``dataset/ml-1m-u2999/ml-1m-u2999.{inter,user,item}``; run with ``--data_path=dataset
--dataset=ml-1m-u2999``. Its text conventions are ``dataset_hooks/ml-1m-u2999.yaml``.

``ml-1m-u2999``: MovieLens-1M restricted to the users 1-2999 whose ratings are available here
(``partial/ratings_users0001-2999.dat.gz``); users, movies and ids as in ML-1M, so released ML-1M
knowledge (e.g. the REKI release) matches by id. It is half of ML-1M and is never called ML-1M.
"""

import argparse
import gzip
import os
import re

from recbole_llmk.files import written_whole


def _read_dat(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="latin-1") as f:
        return [line.rstrip("\n").split("::") for line in f if line.strip()]


def _write(path, header, rows):
    with written_whole(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\t".join(header) + "\n")
        for row in rows:
            f.write("\t".join(str(v) for v in row) + "\n")


def _title_and_year(title):
    """``"Toy Story (1995)"`` -> ``("Toy Story", "1995")``."""
    match = re.match(r"^(.*?)\s*\((\d{4})\)\s*$", title)
    return (match.group(1), match.group(2)) if match else (title.strip(), "")


def convert_ml1m_u2999(source, out):
    ratings_file = os.path.join(source, "partial", "ratings_users0001-2999.dat.gz")
    for path in (ratings_file, os.path.join(source, "users.dat"), os.path.join(source, "movies.dat")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: --source must be the ml-1m folder of the shared data "
                                    "(movies.dat, users.dat, partial/ratings_users0001-2999.dat.gz)")
    name = "ml-1m-u2999"
    folder = os.path.join(out, name)
    os.makedirs(folder, exist_ok=True)
    ratings = _read_dat(ratings_file)
    users_rated = {r[0] for r in ratings}
    _write(os.path.join(folder, f"{name}.inter"), ["user_id:token", "item_id:token", "rating:float", "timestamp:float"],
           ratings)
    users = [u for u in _read_dat(os.path.join(source, "users.dat")) if u[0] in users_rated]
    _write(os.path.join(folder, f"{name}.user"),
           ["user_id:token", "gender:token", "age:token", "occupation:token", "zip_code:token"], users)
    movies = []
    for movie_id, title, genres in _read_dat(os.path.join(source, "movies.dat")):
        movie_title, year = _title_and_year(title)
        movies.append((movie_id, movie_title, year, genres.replace("|", " ")))
    _write(os.path.join(folder, f"{name}.item"),
           ["item_id:token", "movie_title:token_seq", "release_year:token", "genre:token_seq"], movies)
    return {"folder": folder, "interactions": len(ratings), "users": len(users), "items": len(movies)}


CONVERTERS = {"ml-1m-u2999": convert_ml1m_u2999}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(CONVERTERS))
    parser.add_argument("--source", required=True, help="folder of the raw files")
    parser.add_argument("--out", default="dataset", help="RecBole data_path to write into")
    args = parser.parse_args(argv)
    print(CONVERTERS[args.dataset](args.source, args.out))


if __name__ == "__main__":
    main()
