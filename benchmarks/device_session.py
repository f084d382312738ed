"""Run suite cells on a lent GPU machine whose image lacks this project's stack.

The GPU machine has python3 with torch, but no RecBole, numpy<2, text encoder, network or
../shared/data, and lends 15 minutes. So the work is split in three:

    # here: build the stores the cells need (encoder and LLM answers live here), fetch the wheels
    # the image lacks, copy the shared data the suite reads (stores and data travel gzipped);
    # prints the two device calls to make
    python benchmarks/device_session.py pack benchmarks/suites/reki_released_ml100k.yaml --only DIN,DIN_REKI-none
    # there, call 1 (the `run` tool, carrying .device_kit_scipy): scipy<1.13, which numpy 1.26 needs
    python3 benchmarks/device_session.py install .device_kit_scipy
    # there, call 2 within 30 s (carrying .device_kit): install the rest, run the cells for at most
    # N minutes, write each cell to $OUT/cells/ as it finishes
    python3 benchmarks/device_session.py run benchmarks/suites/reki_released_ml100k.yaml --only ... --minutes 8
    # here: add the fetched cells to the suite's results and rebuild its summary
    python benchmarks/device_session.py unpack benchmarks/suites/reki_released_ml100k.yaml <folder holding the fetched cells/>

A cell the device could not finish in time is simply not in cells/; `pack` again for it.
The device builds no knowledge: a store it lacks (say, a split other than the one packed) fails
that cell with the store's own error instead of silently encoding with another model.
"""

import argparse
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import run_suite  # noqa: E402
from harness import schema  # noqa: E402  (the harness whose suites, cells and files this moves)
from harness.users import copy_users  # noqa: E402

KIT = os.path.join(ROOT, ".device_kit")
# scipy travels in a kit of its own: the image's scipy needs numpy 2 (RecBole's models import
# scipy.sparse, so none of them loads beside numpy 1.26), and at ~36 MiB it does not fit beside
# the main kit in one 64 MiB carry. It goes first, in a call of its own, to the same SITE.
SCIPY_KIT = os.path.join(ROOT, ".device_kit_scipy")
SITE = "/tmp/recbole_llmk_site"
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data")
SHARED_MARK = "{repo}/../shared/data/"
CARRY_LIMIT_MB = 60  # the device tool carries 64 MiB in all, the working tree included
# What the image lacks, at the versions tested here (faiss only for clustering and ReLand:
# --wheel faiss-cpu).
WHEELS = ("recbole", "numpy", "pandas", "pytz", "tzdata", "colorlog", "texttable", "thop")
DEVICE_PYTHON = "3.12"
PAYLOAD, PAYLOAD_FOLDERS = "payload.tgz", ("repo", "shared")


def suite_of(path):
    suite = schema.load_suite(path)
    suite["path"] = path
    return suite


def shared_paths(suite):
    """The paths under ../shared/data a suite reads (its ``{repo}/../shared/data/...`` strings),
    with the ML-1M movies.dat a REKI release is resolved against."""
    from recbole_llmk.knowledge.reki_release import default_movies_dat

    text = json.dumps([suite.get("config"), suite.get("model_config"), suite.get("setup"),
                       [e.get("config") for e in suite["entries"]]])
    paths = set()
    for chunk in text.split(SHARED_MARK)[1:]:
        path = chunk.split('"')[0].split(" ")[0].rstrip("/")
        paths.add(path)
        movies = default_movies_dat(os.path.join(SHARED, path))
        if movies:
            paths.add(os.path.relpath(movies, SHARED))
    return sorted(paths)


def pinned(name):
    return f"{name}=={importlib.metadata.version(name)}"


def fetch_wheels(folder, names):
    os.makedirs(folder, exist_ok=True)
    platforms = [arg for tag in ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014")
                 for arg in ("--platform", f"{tag}_x86_64")]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", DEVICE_PYTHON, "--implementation", "cp", *platforms, "-d", folder,
                    *[name if "==" in name else pinned(name) for name in names]], check=True)


def compress_payload(kit):
    """Put the kit's stores and shared data (``repo/``, ``shared/``) into one gzipped tar: their
    texts and the shared data files shrink to about a third (wheels are compressed already, the
    vectors barely shrink), which is what lets a suite's DIN rows on ml-1m-u2999 travel in one kit."""
    folders = [d for d in PAYLOAD_FOLDERS if os.path.isdir(os.path.join(kit, d))]
    with tarfile.open(os.path.join(kit, PAYLOAD), "w:gz") as tar:
        for folder in folders:
            tar.add(os.path.join(kit, folder), arcname=folder)
    for folder in folders:
        shutil.rmtree(os.path.join(kit, folder))


def extract_payload(kit):
    payload = os.path.join(kit, PAYLOAD)
    if os.path.isfile(payload):
        with tarfile.open(payload) as tar:
            tar.extractall(kit, filter="data")


def size_mb(path):
    if os.path.isfile(path):
        return os.path.getsize(path) / 2**20
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


def pack(args):
    suite = suite_of(args.suite)
    subprocess.run([sys.executable, os.path.join(HERE, "run_suite.py"), args.suite, "--stores-only",
                    "--results", args.results] + selection(args), check=True)
    shutil.rmtree(KIT, ignore_errors=True)
    fetch_wheels(os.path.join(KIT, "wheels"), list(WHEELS) + args.wheel)
    fetch_wheels(os.path.join(SCIPY_KIT, "wheels"), ["scipy"])
    for path in shared_paths(suite):
        source, target = os.path.join(SHARED, path), os.path.join(KIT, "shared", "data", path)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        (shutil.copytree if os.path.isdir(source) else shutil.copy2)(source, target)
    folder = os.path.join(args.results, suite["name"])
    for label, seed in schema.selected_cells(suite, args.only, args.seeds):
        built = schema.cell_file(folder, label, seed, "stores")
        if not os.path.isfile(built):
            continue  # finished earlier: nothing to run there
        with open(built) as f:
            store = json.load(f)["store"]
        if store:
            store = os.path.relpath(os.path.join(folder, store), ROOT)
            if store.startswith(".."):
                raise SystemExit(f"store {store} lies outside the repository: set knowledge_dir inside it")
            shutil.copytree(os.path.join(ROOT, store), os.path.join(KIT, "repo", store), dirs_exist_ok=True)
    compress_payload(KIT)
    total = size_mb(KIT)
    print(f"{KIT}: {total:.1f} MiB ({', '.join(f'{d} {size_mb(os.path.join(KIT, d)):.1f}' for d in sorted(os.listdir(KIT)))})")
    if total > CARRY_LIMIT_MB:
        raise SystemExit(f"the kit is {total:.0f} MiB, over the {CARRY_LIMIT_MB} MiB the device carries: run fewer "
                         f"entries or seeds (--only, --seeds)")
    command = ["python3", "benchmarks/device_session.py", "run", os.path.relpath(args.suite, ROOT)] + selection(args)
    print("device calls, the second within the 30 s a machine stays warm:\n"
          f"  run(carry=[\"{os.path.basename(SCIPY_KIT)}\"], command='python3 benchmarks/device_session.py install "
          f"{os.path.basename(SCIPY_KIT)}')\n"
          f"  run(carry=[\"{os.path.basename(KIT)}\"], command={' '.join(command + ['--jobs', '8', '--minutes', '8'])!r})")


def install(kit):
    """On the device machine: install a kit's wheels into SITE, beside the image's torch."""
    folder = os.path.join(kit, "wheels")
    wheels = sorted(os.path.join(folder, w) for w in os.listdir(folder))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--upgrade", "--target", SITE, *wheels], check=True)


def selection(args):
    return (["--only", args.only] if args.only else []) + (["--seeds", args.seeds] if args.seeds else [])


def run(args):
    """On the device machine: install the kit, run the cells for at most ``--minutes``, and
    write each cell to $OUT/cells/ as it finishes (and the log to $OUT)."""
    out = os.environ.get("OUT") or os.path.join(ROOT, "device_out")
    os.makedirs(out, exist_ok=True)
    install(KIT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SITE, ROOT]), PYTHONUNBUFFERED="1")
    probe = ("import numpy, pandas, scipy, recbole, torch; print('stack: numpy', numpy.__version__, 'pandas', "
             "pandas.__version__, 'scipy', scipy.__version__, 'torch', torch.__version__, 'cuda', "
             "torch.cuda.is_available() and torch.cuda.get_device_name(0)); import recbole.model.general_recommender")
    if subprocess.run([sys.executable, "-c", probe], env=env).returncode:
        raise SystemExit(f"RecBole's models do not import on this machine (above). If it is the image's scipy: "
                         f"install {os.path.basename(SCIPY_KIT)} first, in the call just before this one (pack "
                         f"prints both calls)")
    sys.path[:0] = [SITE, ROOT]  # this process reads the suite through the plugin too
    extract_payload(KIT)
    if not os.path.exists(SHARED) and os.path.isdir(os.path.join(KIT, "shared", "data")):
        os.makedirs(os.path.dirname(SHARED), exist_ok=True)
        os.symlink(os.path.join(KIT, "shared", "data"), SHARED)
    if os.path.isdir(os.path.join(KIT, "repo")):
        shutil.copytree(os.path.join(KIT, "repo"), ROOT, dirs_exist_ok=True)
    suite = suite_of(args.suite)
    cells = os.path.join(args.results, suite["name"], "cells")
    returned = os.path.join(out, "cells")
    start = time.time()
    command = [sys.executable, os.path.join(HERE, "run_suite.py"), args.suite, "--jobs", str(args.jobs),
               "--results", args.results] + selection(args)
    with open(os.path.join(out, "run_suite.log"), "w") as log:
        job = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        # Cells go to $OUT as each finishes: a machine reclaimed before --minutes is up (its lease
        # ran out, the call hit its limit) still returns every cell finished by then.
        while job.poll() is None and time.time() - start < args.minutes * 60:
            return_finished_cells(cells, start, returned)
            time.sleep(5)
        if job.poll() is None:  # the cells still running are lost; the finished ones are kept
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            log.write(f"\nstopped after {args.minutes} min\n")
    finished = return_finished_cells(cells, start, returned)
    print(f"{len(finished)} cells finished in {(time.time() - start) / 60:.1f} min: {', '.join(finished) or 'none'}")
    with open(os.path.join(out, "run_suite.log")) as f:
        print(f.read()[-6000:])


def return_finished_cells(cells, start, returned):
    """Copy the cells written since ``start`` into ``returned`` (and their users into ``returned``'s
    sibling ``users``), each whole (a copy cut short by the machine going away ends in ``.partial``,
    which unpack ignores); -> their names."""
    os.makedirs(returned, exist_ok=True)
    names = [f for f in sorted(os.listdir(cells)) if f.endswith(".json")
             and os.path.getmtime(os.path.join(cells, f)) >= start] if os.path.isdir(cells) else []
    for name in names:
        if not os.path.exists(os.path.join(returned, name)):
            copy_users(os.path.join(cells, name), os.path.join(returned, name))  # first: a returned cell's users are there
            with run_suite.written_whole(os.path.join(returned, name)) as tmp:
                shutil.copy2(os.path.join(cells, name), tmp)
    return names


def unpack(args):
    """Add the cells in ``<folder>/cells/`` (and their users in ``<folder>/users/``) to the suite's
    results (never over a cell already there) and rebuild its summary."""
    suite = suite_of(args.suite)
    cells = os.path.join(args.results, suite["name"], "cells")
    os.makedirs(cells, exist_ok=True)
    fetched = os.path.join(args.folder, "cells")
    for name in sorted(os.listdir(fetched)):
        if not name.endswith(".json"):
            continue
        if os.path.exists(os.path.join(cells, name)):
            print(f"{name}: already in {cells}, kept")
            continue
        copy_users(os.path.join(fetched, name), os.path.join(cells, name))
        shutil.copy2(os.path.join(fetched, name), os.path.join(cells, name))
        print(f"{name}: added")
    subprocess.run([sys.executable, os.path.join(HERE, "run_suite.py"), args.suite, "--summary-only",
                    "--results", args.results], check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=("pack", "install", "run", "unpack"))
    parser.add_argument("suite", help="the suite (install: the kit folder to install)")
    parser.add_argument("folder", nargs="?", help="unpack: the folder holding the fetched cells/")
    parser.add_argument("--only", default=None)
    parser.add_argument("--seeds", default=None)
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--wheel", action="append", default=[], help="pack: another wheel the cells need (e.g. faiss-cpu)")
    parser.add_argument("--jobs", type=int, default=8, help="run: cells at once")
    parser.add_argument("--minutes", type=float, default=8, help="run: stop the cells after this long")
    args = parser.parse_args()
    args.suite = os.path.abspath(args.suite)
    if args.step == "install":
        return install(args.suite)
    {"pack": pack, "run": run, "unpack": unpack}[args.step](args)


if __name__ == "__main__":
    main()
