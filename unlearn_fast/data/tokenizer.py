"""A real byte-level BPE tokenizer trained on a task's text with the ``tokenizers``
library and wrapped as a ``transformers.PreTrainedTokenizerFast`` (saved and loaded with
the usual ``save_pretrained`` / ``AutoTokenizer.from_pretrained``).

Byte-level: any string tokenizes (no unknown tokens), so user data works with the
built-in model's tokenizer too.  Special tokens: ``<pad>`` ``<s>`` ``</s>`` ``<unk>``
``<image>`` (the image placeholder, expanded to one token per image feature by the
model adapters) and ``<|vision_start|>`` ``<|vision_end|>`` (Qwen2-VL's image frame).
"""
from __future__ import annotations

from typing import Iterable

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
# </s> is not id 2: CLIPTextModel treats eos_token_id == 2 as a legacy config and pools
# at the largest token id instead of at </s>
SPECIAL_TOKENS = (PAD, BOS, UNK, EOS, IMAGE, VISION_START, VISION_END)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 700):
    """Train a byte-level BPE on ``texts`` and return a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # trim_offsets: a token's character span excludes its leading space, so target
    # phrase spans map onto tokens exactly
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=1, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = list(texts)
    # train on each text as it starts a prompt and as it follows a space, so both
    # forms get whole-word merges
    tok.train_from_iterator(texts + [" " + t for t in texts], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                   unk_token=UNK, additional_special_tokens=[IMAGE, VISION_START, VISION_END],
                                   padding_side="right", clean_up_tokenization_spaces=False)


def token_id(tokenizer, token: str) -> int:
    """The id of a special token, with a clear error when the tokenizer lacks it."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tokenizer.unk_token_id is not None and tid == tokenizer.unk_token_id and token != UNK):
        raise ValueError(f"the tokenizer has no {token!r} token; build it with unlearn_fast.data.build_tokenizer "
                         f"or add it as a special token")
    return int(tid)


def name_token_ids(tokenizer, variants: Iterable[str]):
    """Token ids of a concept's name spellings (K_V = 0 in SIU's dual masked KL): each
    variant as tokenized at the start of a text, after a space, and capitalised."""
    ids = set()
    for v in variants:
        for form in {v, v.lower(), v.capitalize()}:
            for text in (form, " " + form):
                for tid in tokenizer(text, add_special_tokens=False)["input_ids"]:
                    piece = tokenizer.decode([tid]).strip()
                    # a piece of the name, never a bare space or punctuation token
                    if piece and piece.lower() in form.lower():
                        ids.add(int(tid))
    return sorted(ids)
