"""Run a benchmark suite: stock RecBole models vs their knowledge-augmented variants.

    python benchmarks/run_suite.py benchmarks/suites/reki_ml100k.yaml [--only DeepFM,DeepFM_REKI] [--seeds 2020,2021] [--results results]
    python benchmarks/run_suite.py benchmarks/suites/reki_ml100k.yaml --stores-only   # knowledge only, no training

A suite yaml names a dataset, models, seeds and config overrides (see ``benchmarks/suites``).
Each (model, seed) cell runs in its own process (clean peak memory, clean logging) and is saved
as JSON under ``<results>/<suite>/cells`` with the settings it ran under; a rerun skips finished
cells, save those whose run the suite has changed since (set aside in ``stale``, run again); a
full-ranking cell's test users' values go beside it, under ``users``. The summary (CSV +
markdown, with mean ± std over seeds and a paired t-test of each variant against its stock
backbone on matched seeds, and where the cells recorded their users, the difference's interval
over the test users) is rebuilt from all finished cells. ``--stores-only`` builds the
knowledge stores the unfinished cells need and trains nothing: build them where the encoder and
the LLM are, train where the GPU is (``benchmarks/device_session.py``). Not part of the test suite.
"""

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, HERE]

from harness.cells import build_cell_store, run_cell  # noqa: E402  (light: no torch, no RecBole until a cell runs)
from harness.plots import plot_cost, plot_uplift  # noqa: E402
from harness.reports import n_cells, write_reports  # noqa: E402
from harness.schema import cell_config, cell_file, cell_settings, entries, finished_cells, load_suite, read_cell, selected_cells  # noqa: E402
from harness.staleness import reuse_cell, stale_keys, twin_cell  # noqa: E402
from harness.statistics import summarize  # noqa: E402
from harness.users import cell_users, users_file, write_users  # noqa: E402
from recbole_llmk.files import written_whole  # noqa: E402

PROGRESS = "@progress "  # a cell's progress reports on its stdout start with this


def set_aside(folder, path):
    """Move a cell that no longer matches its suite to ``<folder>/stale`` (its numbers are kept,
    out of the summary); -> where it went."""
    target = os.path.join(folder, "stale", f"{time.strftime('%Y%m%d-%H%M%S')}-{os.path.basename(path)}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    os.replace(path, target)
    return os.path.relpath(target, folder)




def resume_file_of(folder, label, seed):
    """Where a cell's training state waits for a rerun after a kill (removed when the cell ends)."""
    return cell_file(folder, label, seed, "claims", ".resume.pth")


def report_progress(**event):
    """A cell's progress (see ``run_cell``), for the runner that started it."""
    print(PROGRESS + json.dumps(event), flush=True)


def follow_progress(lines, name):
    """Show a running cell's progress from its reports on ``lines`` until it ends: when its
    knowledge was ready, then a bar of its training epochs with the time left (epochs, not
    batches: a Beauty SASRec epoch is minutes on a CPU)."""
    from tqdm import tqdm

    bar = None
    try:
        for line in lines:
            if not line.startswith(PROGRESS):
                continue
            event = json.loads(line[len(PROGRESS):])
            if "knowledge_seconds" in event:
                tqdm.write(f"    {name}: knowledge ready after {event['knowledge_seconds']:.0f} s", file=sys.stdout)
            elif bar is None:  # a resumed cell starts after its saved epochs: they are not timed
                # every epoch shown (tqdm skips updates within 0.1 s of the last, and tiny epochs are that fast)
                bar = tqdm(total=event["epochs"], initial=event["epoch"], desc=f"    {name}", unit="epoch", leave=False,
                           mininterval=0, miniters=1)
            else:
                bar.update(event["epoch"] - bar.n)
    finally:
        if bar is not None:
            bar.close()


def claim(folder, label, seed, kind):
    """A context yielding True when this process now holds the (label, seed) cell, False when
    another runner does. Runners started side by side on one suite (to use more cores) so run each
    cell once; a claim ends with its process, so a killed runner leaves nothing to clean up (but
    its training state, which the cell's next run continues)."""
    from recbole_llmk.knowledge.pipeline import file_lock

    return file_lock(cell_file(folder, label, seed, "claims", f".{kind}.lock"), wait=False)


def run_cells(suite, folder, todo, jobs=1, stores_only=False):
    """Run the unfinished (label, seed) cells, ``jobs`` processes at a time, each in its own
    process; -> (the cells that failed (their stderr is printed, the others go on), how many ran).
    ``stores_only``: each builds only its knowledge store, reported under ``<folder>/stores``.
    A cell another runner holds, or finished since this one started, is skipped; one that is the
    same run as a finished cell of a suite in ``reuse_cells_from`` is copied from it."""
    from concurrent.futures import ThreadPoolExecutor

    env = dict(os.environ)
    if jobs > 1:  # cells share the cores instead of each taking all of them
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    kind = "stores" if stores_only else "cells"
    os.makedirs(os.path.join(folder, kind), exist_ok=True)
    pending = []
    by_label = {e["label"]: e for e in entries(suite)}
    for index, (label, seed) in enumerate(todo, 1):
        done, recorded = cell_file(folder, label, seed), read_cell(folder, label, seed)
        if recorded is not None:
            changed = stale_keys(suite, recorded)
            if not changed:
                print(f"[{index}/{len(todo)}] {label} seed {seed}: done earlier, skipped", flush=True)
                continue
            print(f"[{index}/{len(todo)}] {label} seed {seed}: done earlier under other settings "
                  f"({', '.join(changed)}), set aside as {set_aside(folder, done)}", flush=True)
        settings = cell_settings(suite, by_label[label], seed)
        twin = None if stores_only else twin_cell(suite, by_label[label]["model"], settings, seed, os.path.dirname(folder))
        if twin:
            reuse_cell(twin, label, settings, done)
            print(f"[{index}/{len(todo)}] {label} seed {seed}: the same run as {twin}, copied", flush=True)
        else:
            pending.append((index, label, seed))

    def run(index, label, seed):  # -> (whether it ran, its name if it failed)
        output = cell_file(folder, label, seed, kind)
        with claim(folder, label, seed, kind) as mine:
            if not mine or (not stores_only and os.path.isfile(output)):
                print(f"[{index}/{len(todo)}] {label} seed {seed}: "
                      f"{'another runner has it' if not mine else 'finished by another runner'}, skipped", flush=True)
                return False, None
            # the cell's own output (RecBole's log, the LLM's and the encoder's progress bars) goes to a
            # file to follow while it runs; kept only if the cell fails
            console = cell_file(folder, label, seed, "claims", f".{kind}.out")
            print(f"[{index}/{len(todo)}] {label} seed {seed} ... (its output: {os.path.relpath(console)})", flush=True)
            begin = time.time()
            with open(console, "w") as err:
                cell = subprocess.Popen([sys.executable, os.path.abspath(__file__), suite["file"],
                                         f"--cell={label},{seed},{output}"] + (["--stores-only"] if stores_only else []),
                                        cwd=folder, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
                follow_progress(cell.stdout, f"{label} seed {seed}")
                returncode = cell.wait()
        if returncode != 0:
            with open(console) as f:
                tail = f.read()[-4000:]
            print(f"{label} seed {seed} failed (exit {returncode}; its output: {console}):\n{tail}", file=sys.stderr, flush=True)
            return True, f"{label}-{seed}"
        os.remove(console)
        with open(output) as f:
            result = json.load(f)
        shown = result["store"] if stores_only else result["test"]
        print(f"    {label} seed {seed}: {shown}  ({time.time() - begin:.0f} s)", flush=True)
        return True, None

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        outcomes = list(pool.map(lambda job: run(*job), pending))
    return [failure for _, failure in outcomes if failure], sum(ran for ran, _ in outcomes)


def run_setup(suite, folder):
    """The suite's ``setup`` commands (idempotent ones, e.g. writing a model a cell reads), in the
    repository, before any cell; ``{python}`` is this interpreter, ``{repo}`` the repository.
    One runner at a time: two runners started together would write the same files at once."""
    import shlex

    from recbole_llmk.knowledge.pipeline import store_lock

    with store_lock(os.path.join(folder, "claims", "setup")):
        for command in suite.get("setup") or []:
            argv = [part.format(python=sys.executable, repo=ROOT) for part in shlex.split(command)]
            print(f"setup: {' '.join(argv)}", flush=True)
            subprocess.run(argv, cwd=ROOT, check=True)


def read_suite(path):
    suite = load_suite(path)
    suite["path"] = os.path.relpath(path, ROOT)
    return suite


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--only", default=None, help="comma-separated models to run (summary uses all cells)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds to run (summary uses all cells)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run at once (a GPU machine with many cores)")
    parser.add_argument("--summary-only", action="store_true",
                        help="rebuild the summary from the finished cells, run no cell (e.g. cells run elsewhere)")
    parser.add_argument("--stores-only", action="store_true",
                        help="build the knowledge stores the unfinished cells need, train nothing")
    parser.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: model,seed,output
    args = parser.parse_args()
    args.suite = os.path.abspath(args.suite)  # cells run inside the results folder
    suite = read_suite(args.suite)
    by_label = {e["label"]: e for e in suite["entries"]}
    if args.cell:
        label, seed, output = args.cell.split(",", 2)
        sys.argv = sys.argv[:1]  # RecBole's Config reads argv
        entry = by_label[label]
        config = cell_config(suite, entry, int(seed))
        if args.stores_only:
            cell = build_cell_store(entry["model"], suite["dataset"], config)
        else:
            folder = os.path.dirname(os.path.dirname(os.path.abspath(output)))
            cell = run_cell(entry["model"], suite["dataset"], config, label, resume_file_of(folder, label, seed),
                            report_progress)
            cell["settings"] = cell_settings(suite, entry, int(seed))
            users = cell.pop("per_user_test", None)
            if users:  # before the cell: a finished cell's users are there
                write_users(users_file(output), users)
        with written_whole(output) as tmp, open(tmp, "w") as f:
            json.dump(cell, f, indent=2)
        return
    folder = os.path.join(args.results, suite["name"])
    os.makedirs(os.path.join(folder, "cells"), exist_ok=True)
    todo = selected_cells(suite, args.only, args.seeds)
    start = time.time()
    failed, ran = [], 0
    if not args.summary_only:
        run_setup(suite, folder)
        failed, ran = run_cells(suite, folder, todo, args.jobs, args.stores_only)
    if args.stores_only:
        if failed:
            raise SystemExit(f"{len(failed)} stores failed: {', '.join(failed)}")
        print(f"{n_cells(ran)}' knowledge stores built or found in {(time.time() - start) / 60:.1f} min; no cell trained")
        return
    if ran:  # read again: rows added to the file while the cells ran (hours) belong in the summary
        suite = read_suite(args.suite)
    cells, stale = [], {}
    for cell in finished_cells(folder):
        changed = stale_keys(suite, cell)
        if changed:
            stale[f"{cell['model']}-{cell['seed']}"] = changed
        else:
            cells.append(cell)
    if not cells:
        raise SystemExit(f"no finished cells in {folder}: {len(failed)} failed, {len(stale)} ran under other settings")
    rows = summarize(suite, cells, lambda cell: cell_users(folder, cell))
    print(write_reports(suite, rows, folder, time.time() - start, args.jobs, ran, cells, stale))
    metric = suite.get("plot_metric") or sorted(cells[0]["test"])[0]
    print(f"plot: {plot_uplift(cells, suite, metric, os.path.join(folder, 'uplift.png'))}")
    cost = plot_cost(rows, metric, os.path.join(folder, "cost.png"))
    if cost:
        print(f"cost/quality plot: {cost}")
    if failed:
        raise SystemExit(f"{len(failed)} cells failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
