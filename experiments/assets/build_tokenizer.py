"""Train the small byte-level BPE tokenizer shipped in ``freeact/assets/tokenizer/``.

Trained with the ``tokenizers`` library on ``freeact/assets/text/wiki.train.txt`` and
``english.train.txt`` (built by ``build_text.py``), one paragraph per training example.

* vocab size 4096, GPT-2 style byte-level pre-tokenization: every string is encodable,
  there is no unknown token, and decoding is lossless;
* ``<|endoftext|>`` is id 0 and serves as BOS, EOS and pad token;
* ``<|mdm_mask|>`` is id 1, the mask token of masked-diffusion LMs;
* no special tokens are added automatically when encoding.

The output is a transformers tokenizer directory, loadable offline with
``transformers.AutoTokenizer.from_pretrained("freeact/assets/tokenizer")``.

Usage::

    python experiments/assets/build_tokenizer.py
"""

import json
import os
from pathlib import Path

os.environ["RAYON_NUM_THREADS"] = "1"       # pin threading; output is byte-identical run to run
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "freeact" / "assets"
TEXTS = ["wiki.train.txt", "english.train.txt"]
OUT = ASSETS / "tokenizer"
VOCAB_SIZE = 4096
EOS, MASK = "<|endoftext|>", "<|mdm_mask|>"


def paragraphs():
    for name in TEXTS:
        text = (ASSETS / "text" / name).read_text(encoding="utf-8")
        yield from (p.strip() for p in text.split("\n\n") if p.strip())


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
        special_tokens=[EOS, MASK], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(paragraphs(), trainer)
    assert tok.token_to_id(EOS) == 0 and tok.token_to_id(MASK) == 1

    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS,
                                   pad_token=EOS, mask_token=MASK)
    fast.save_pretrained(OUT)
    config = json.loads((OUT / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"     # loadable by transformers 4.x too
    (OUT / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    size = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"saved {OUT} ({size:,} bytes): vocab {fast.vocab_size}, "
          f"{EOS}={fast.eos_token_id}, {MASK}={fast.mask_token_id}")


if __name__ == "__main__":
    main()
