"""Train and evaluate a RecBole model, or its LLM-knowledge variant, RecBole-style.

    python run_recbole_llmk.py --model=DIN_REKI --dataset=ml-100k
    python run_recbole_llmk.py --model=DIN --dataset=ml-100k            # the stock baseline
    python run_recbole_llmk.py --model=DeepFM_REKI --dataset=ml-100k --config_files="a.yaml b.yaml" --epochs=5
    python run_recbole_llmk.py --model=DeepFM_REKI --dataset=ml-100k --run=knowledge   # build the store only
    python run_recbole_llmk.py --model=DeepFM_REKI --dataset=ml-100k --nproc=2   # RecBole's distributed training (GPUs or CPUs)
    python run_recbole_llmk.py --model=DIN_REKI --llm_backend=openai --llm_model=gpt-4o-mini \
        --run=export_batch --batch_file=prompts.jsonl       # then --run=import_batch --batch_file=results.jsonl

Any other ``--key=value`` overrides a config key, as in RecBole.
"""

import argparse

from recbole_llmk.quick_start import RUNS, run_recbole_llmk

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", "-m", type=str, default="DIN_REKI", help="model name")
    parser.add_argument("--dataset", "-d", type=str, default="ml-100k", help="dataset name")
    parser.add_argument("--config_files", type=str, default=None, help="space-separated yaml files")
    parser.add_argument("--run", type=str, default="train", choices=list(RUNS))
    # RecBole's run_recbole.py arguments for distributed training
    parser.add_argument("--nproc", type=int, default=1, help="the number of processes (one per GPU, or CPU processes)")
    parser.add_argument("--ip", type=str, default="localhost", help="the ip of master node")
    parser.add_argument("--port", type=str, default="5678", help="the port of master node")
    parser.add_argument("--world_size", type=int, default=-1, help="total number of jobs")
    parser.add_argument("--group_offset", type=int, default=0, help="the global rank offset of this group")
    # RecBole's Config reads the remaining --key=value pairs from sys.argv itself.
    args, _ = parser.parse_known_args()
    files = args.config_files.strip().split(" ") if args.config_files else None
    run_recbole_llmk(model=args.model, dataset=args.dataset, config_file_list=files, run=args.run, nproc=args.nproc,
                     world_size=args.world_size, ip=args.ip, port=args.port, group_offset=args.group_offset)
