"""`afford zoo tokenizer`: a byte-level BPE trained with the `tokenizers` library, saved so that
`transformers.AutoTokenizer` loads it (tokenizer.json + tokenizer_config.json)."""
from __future__ import annotations

from pathlib import Path

from afford.config import ConfigError

EOS, PAD = "<|endoftext|>", "<|pad|>"
SPECIALS = (EOS, PAD)


def train_tokenizer(texts: list[str], vocab_size: int, out: str | Path, overwrite: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIALS):
        raise ConfigError(f"vocab size {vocab_size} is smaller than the byte alphabet plus special tokens "
                          f"({len(alphabet) + len(SPECIALS)}); pick at least 512")
    if not any(t.strip() for t in texts):
        raise ConfigError("the corpus is empty: give the tokenizer some text")
    out = Path(out)
    if (out / "tokenizer.json").exists() and not overwrite:
        raise ConfigError(f"{out} already holds a tokenizer; pass --overwrite to replace it")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=None, model_max_length=1 << 30)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return fast
